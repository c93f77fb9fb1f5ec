"""A benchmark study run as a sweep, shared by ``bench_bpd_configs.py`` and ``bench_recipes.py``: the
rows its results JSON holds already are left out, the rest trained by ``pipelines.tuning`` (``run_sweep``,
one trial per row), then each trial's model scored and the JSON rewritten after every row.

* ``add_study_arguments`` / ``check_study_arguments``: the options every study takes (base config, sweep
  YAML, shards, storage, rows, per-trial budget, the bound's settings, the sweep's name, overrides);
* ``open_study``: the rows done, the base config with absolute shards and storage, and the study's sweep
  spec checked against it (before the script's own checks, e.g. the FD classifier's floor);
* ``run_study``: the sweep, each trial with a model scored by the script's callable, the JSON (machine
  info and ``finished_at`` on every row) and the tables.

What a script scores (``scoring.py``) and which figures it adds stay in the script.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml
from cli import require_at_least
from machine import machine_info
from mlflow import MlflowClient
from report import build_report, load_average_1m, read_figures, write_report

from pipelines.data import storage
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import TrainConfig, load_config
from pipelines.tuning.driver import SweepRequest, run_sweep
from pipelines.tuning.spec import SweepSpec

#: ``build_spec(raw, done)``: the study's sweep from the parsed sweep YAML and the rows measured already.
SpecBuilder = Callable[[Mapping[str, Any], Sequence[str]], SweepSpec]
#: ``score(trial, client)``: the results row (its name under ``"row"``) of one trial that logged a model;
#: ``trial`` is a row of ``run_sweep``'s ``"rows"``, ``client`` the MLflow client of the tracking URI.
TrialScorer = Callable[[Mapping[str, Any], MlflowClient], dict[str, Any]]
#: ``table(rows)``: the text table of results rows.
TableFormatter = Callable[[list[dict[str, Any]]], str]


def add_study_arguments(parser: argparse.ArgumentParser, *, sweep: Path, storage: Path, name_prefix: str,
                        root: Path) -> None:
    """Add the options every study takes: ``--config`` (default ``configs/fashion_mnist.yaml`` under
    ``root``), ``--sweep`` (default ``sweep``), ``--shards``, ``--storage`` (``train.storage_path``,
    default ``storage``), ``--rows``, ``--minutes`` (training wall time per trial), ``--max-steps``
    (``train.total_steps``), ``--test-images`` and ``--estimate`` (the bound on the first N test images
    with K timesteps per image), ``--workers`` (Ray actors of the bound), ``--name`` (default
    ``<name_prefix>-<time>``) and ``--set`` (``KEY=VALUE`` overrides for every trial)."""
    parser.add_argument("--config", default=str(root / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--sweep", default=str(sweep), help="the study's sweep YAML (its variants are the rows)")
    parser.add_argument("--shards", default=str(root / "data" / "fashion-mnist-shards"))
    parser.add_argument("--storage", default=str(storage), help="train.storage_path")
    parser.add_argument("--rows", nargs="+", default=None, help="variants of the sweep (default: all)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time per trial (> 0)")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="train.total_steps (the budget ends first)")
    parser.add_argument("--test-images", type=int, default=1000, help="first N test images for the bound")
    parser.add_argument("--estimate", type=int, default=16, help="K, timesteps per image of the estimated bound")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors of the bound")
    parser.add_argument("--name", default=None, help=f"the sweep's name (default {name_prefix}-<time>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every trial (e.g. train.fd_every=0 for a quick try)")


def check_study_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                          minimums: Mapping[str, float] | None = None) -> None:
    """Exit through ``parser.error`` (status 2) for ``--minutes <= 0`` or a study option (``--max-steps``,
    ``--test-images``, ``--estimate``, ``--workers``) or one of the script's ``minimums`` below its minimum."""
    if args.minutes <= 0:
        parser.error(f"--minutes={args.minutes} must be > 0")
    require_at_least(parser, args, {"max_steps": 1, "test_images": 1, "estimate": 2, "workers": 0, **(minimums or {})})


@dataclass(frozen=True)
class Study:
    """A study ready to run (``open_study``).

    Attributes:
        output: the results JSON (``--output``).
        done: the rows in ``output`` already, by name (empty when there is no such file).
        shards: the shard folder's absolute URI (Ray Train workers run in another directory).
        base: the base config with absolute ``data.shards`` and ``train.storage_path``, no ``train.run_name``.
        sweep_text: the sweep YAML as given (logged to the sweep's parent run).
        raw: the sweep YAML parsed.
        spec: the study's sweep (the rows left to run), checked against ``base``.
    """

    output: Path
    done: Mapping[str, dict[str, Any]]
    shards: str
    base: TrainConfig
    sweep_text: str
    raw: Mapping[str, Any]
    spec: SweepSpec


def open_study(args: argparse.Namespace, build_spec: SpecBuilder) -> Study:
    """Read the rows done, resolve the base config and build the study's sweep spec, checked against it.

    Args:
        args: the script's command line; read: ``output``, ``shards``, ``storage``, ``config``, ``set``
            (overrides for every trial), ``sweep``.
        build_spec: the study's sweep from the parsed YAML and the names of the rows done.

    Raises:
        ValueError: an ``output`` that is not a benchmark report; a bad config or override; whatever
            ``build_spec`` raises (a row not in the sweep, nothing left to run); a spec that does not
            fit the base config (``SweepSpec.check_against``).
        FileNotFoundError: a missing ``--config`` or ``--sweep`` file.
    """
    output = Path(args.output)
    done = {r["row"]: r for r in (read_figures(output)["rows"] if output.is_file() else [])}
    shards = storage.resolve(args.shards).uri  # absolute: Ray Train workers run in another directory
    base = load_config(args.config, args.set).replace({
        "data.shards": shards, "train.storage_path": storage.resolve(args.storage).uri, "train.run_name": None})
    sweep_text = Path(args.sweep).read_text()
    raw = yaml.safe_load(sweep_text)
    spec = build_spec(raw, list(done))
    spec.check_against(base)
    return Study(output=output, done=done, shards=shards, base=base, sweep_text=sweep_text, raw=raw, spec=spec)


def run_study(study: Study, args: argparse.Namespace, argv: Sequence[str], script: str, name_prefix: str,
              score: TrialScorer, table: TableFormatter, figures: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the study's sweep, then score each trial that logged a model and rewrite the results JSON after
    every row (a long study keeps what it measured); prints each row's table as it is scored, a line for
    each trial left unscored, then the table of every row and where the JSON went.

    Each row is ``score``'s with ``machine`` (``machine_info`` and the 1-minute load average at the start
    and now) and ``finished_at`` added. The JSON's figures: ``config``, ``sweep``, ``sweep_name``,
    ``sweep_parent_run_id``, ``sweep_minutes``, ``minutes``, ``shards``, then ``figures``, then ``rows``
    (those done before, then the new ones).

    Args:
        study: from ``open_study``.
        args: the script's command line; read: ``name`` (the sweep's name, ``None``: ``<name_prefix>-<time>``),
            ``config``, ``sweep``, ``minutes``, ``shards``.
        argv: the command line's arguments, for the JSON's ``command``.
        script: the script's name (``bench_<what>``), for the JSON's ``command``.
        name_prefix: the default sweep name's prefix.
        score: a trial's results row.
        table: the text table of rows.
        figures: the script's figures, constant over the rows (its settings and references).

    Returns:
        Every row of the JSON.

    Raises:
        ValueError, FileNotFoundError: as ``run_sweep`` (bad shards or resources, a sweep of that name
            exists, a missing FD classifier); whatever ``score`` raises.
    """
    done = dict(study.done)
    load_start = load_average_1m()
    name = args.name or f"{name_prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    outcome = run_sweep(SweepRequest(base=study.base, spec=study.spec, name=name, sweep_text=study.sweep_text))
    sweep_minutes = (time.monotonic() - started) / 60
    client = MlflowClient(resolve_tracking_uri())
    for trial in outcome["rows"]:
        if not trial["model_uri"]:
            print(f"{trial['variant']}: trial {trial['trial_id']} {trial['outcome']} without a model "
                  f"({trial['error'] or 'no error'}); not scored", flush=True)
            continue
        row = score(trial, client)
        machine = {**machine_info(torch.device("cpu")), "load_average_1m": {"start": load_start, "end": load_average_1m()}}
        done[row["row"]] = row = {**row, "machine": machine, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        report = {"config": args.config, "sweep": args.sweep, "sweep_name": name,
                  "sweep_parent_run_id": outcome["parent_run_id"], "sweep_minutes": sweep_minutes,
                  "minutes": args.minutes, "shards": str(Path(args.shards).resolve()), **(figures or {}),
                  "rows": list(done.values())}
        # after every row: a long study keeps what it measured
        write_report(study.output, build_report(script, argv, machine_info(torch.device("cpu")), load_start, report))
        print(table([row]), flush=True)
    print(table(list(done.values())))
    print(f"wrote {study.output.resolve()}")
    return list(done.values())
