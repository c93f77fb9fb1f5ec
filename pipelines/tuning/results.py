"""The sweep's results, read from its MLflow child runs: one row per trial, the best trial, and the
files written at the end (the results table as CSV, the best trial's resolved config as YAML)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

from mlflow.entities import Run

from pipelines.training.tags import MODEL_URI_TAG
from pipelines.tuning.spec import SweepSpec
from pipelines.tuning.tracking import ERROR_TAG, OUTCOME_TAG, TRIAL_TAG, VARIANT_TAG

FIXED_COLUMNS = ("trial_id", "variant", "outcome", "status", "step", "run_id", "model_uri", "error")


def trial_row(run: Run, spec: SweepSpec, last_step: int | None) -> dict[str, Any]:
    """One child run as a row: trial id, variant, outcome, MLflow status, ``last_step`` (the last
    step of its ``loss`` history), every searched value (the run's params) and the latest value of
    the sweep's metric (``None`` when never logged)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: dict[str, Any] = {
        "trial_id": tags.get(TRIAL_TAG), "variant": tags.get(VARIANT_TAG), "outcome": tags.get(OUTCOME_TAG),
        "status": run.info.status, "step": last_step, "run_id": run.info.run_id,
        "model_uri": tags.get(MODEL_URI_TAG), "error": tags.get(ERROR_TAG),
    }
    row.update({key: params.get(key) for key in spec.search_space})
    row[spec.metric] = metrics.get(spec.metric)
    return row


def best_row(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> Mapping[str, Any] | None:
    """The row with the best finite metric (``spec.mode``) among trials that did not fail; ``None``
    when none has one."""
    scored = [r for r in rows if r["outcome"] != "failed" and _finite(r.get(spec.metric))]
    if not scored:
        return None
    pick = min if spec.mode == "min" else max
    return pick(scored, key=lambda r: float(r[spec.metric]))


def columns(spec: SweepSpec) -> list[str]:
    """The table's columns: trial id, variant, the searched keys, the metric, then the rest."""
    return ["trial_id", "variant", *spec.search_space, spec.metric,
            *[c for c in FIXED_COLUMNS if c not in ("trial_id", "variant")]]


def to_csv(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> str:
    """The rows as CSV text (``columns`` order; empty cells for ``None``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(spec), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def to_text(rows: Sequence[Mapping[str, Any]], spec: SweepSpec) -> str:
    """The rows as an aligned text table for the terminal (the error column left out)."""
    names = [c for c in columns(spec) if c not in ("error", "model_uri", "run_id")]
    cells = [[_cell(row.get(c)) for c in names] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))
