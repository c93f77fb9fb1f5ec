"""The results JSON of every benchmark, with fixed top-level keys::

    {"date":    "2026-12-07T06:30:00+00:00",   # UTC, when the file was written
     "commit":  "48c1f9c" (+ "-dirty" when tracked files differ from it; null outside a git checkout),
     "machine": machine.machine_info(...) + {"load_average_1m": {"start": float, "end": float}},
     "command": "python benchmarks/bench_core.py --quick",
     "figures": {...}}                          # the script's own measurements and settings

The 1-minute load average is the only load figure, always under ``machine.load_average_1m`` (``start``
when the measurement began, ``end`` when the file was written). Standard library only."""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

REPORT_KEYS = ("date", "commit", "machine", "command", "figures")
REPO = Path(__file__).resolve().parents[1]


def load_average_1m() -> float:
    """The machine's 1-minute load average (``os.getloadavg()[0]``, runnable processes)."""
    return os.getloadavg()[0]


def git_commit() -> str | None:
    """The checkout's short commit, ``"-dirty"`` appended when tracked files differ from it; ``None``
    when git or the repository is unavailable (e.g. the script copied to a bare GPU machine)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def command_line(script: str, argv: Sequence[str]) -> str:
    """``python benchmarks/<script>.py <argv...>``, shell-quoted."""
    return shlex.join(["python", f"benchmarks/{script}.py", *map(str, argv)])


def build_report(script: str, argv: Sequence[str], machine: Mapping[str, Any], load_start: float,
                 figures: Mapping[str, Any]) -> dict[str, Any]:
    """The report dict (keys ``REPORT_KEYS``) for ``figures`` measured by ``script`` run with ``argv``;
    ``load_start`` is ``load_average_1m()`` taken before measuring."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {**machine, "load_average_1m": {"start": load_start, "end": load_average_1m()}},
        "command": command_line(script, argv),
        "figures": dict(figures),
    }


def _json_default(value: Any) -> Any:
    return str(value)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf: not JSON) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write ``report`` (from ``build_report``) as indented JSON to ``path`` (parents created; NaN and
    inf as null; other non-JSON values as ``str``); returns the absolute path."""
    output = Path(path).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(_finite(dict(report)), indent=2, default=_json_default) + "\n")
    return output


def read_figures(path: str | Path) -> dict[str, Any]:
    """The ``figures`` of a results JSON written by ``write_report``.

    Raises:
        ValueError: if the file lacks any of ``REPORT_KEYS``.
    """
    report = json.loads(Path(path).read_text())
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise ValueError(f"{path}: not a benchmark report, missing {missing}")
    return report["figures"]
