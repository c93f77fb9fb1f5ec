"""Which training config gives the best test-set bits/dim at equal training wall time: the sweep
``configs/sweeps/bpd_configs.yaml`` run by ``pipelines.tuning``, then each trial's model scored on the
test split.

The sweep trains ``--config`` (default ``configs/fashion_mnist.yaml``) with each row's overrides times
each noise schedule (``--rows`` x ``--schedules``, one Ray Tune trial per pair, named ``<row>-<schedule>``)
for ``--minutes`` of training wall time (``train.max_minutes``; ``train.total_steps`` is raised to
``--max-steps`` so that the budget ends the run), one trial at a time, on the local Ray cluster (or
``$RAY_ADDRESS``), nested under one MLflow parent run. The rows (the sweep's variants):

* ``simple``: the config as it is (simple loss, fixed_small variance: the bound's variances are
  not learned);
* ``hybrid``: L_simple + 0.001 L_vlb with ``learned_range`` variances (Nichol & Dhariwal 2021, sec. 3.1);
* ``vlb_is``: L_vlb alone with ``learned_range`` and importance-sampled timesteps
  (``train.timestep_sampler: loss_second_moment``, Nichol & Dhariwal 2021, sec. 3.3).

The table is made from the sweep's MLflow child runs: each trial that logged a model is scored on the
first ``--test-images`` images of the shards' ``test`` split with the estimated bound (``--estimate`` K
stratified timesteps per image, over ``--workers`` Ray actors; ``evaluation.job.evaluate``, logged as an
evaluation run). A row's figures: steps reached, training minutes, the bound (total, its standard error
over images, L_T / sum of L_t / L_0), the last ``fd``, ``fd_floor`` and ``val_bpd`` the run logged, and
the model's URI. The JSON (default ``benchmarks/results/bench_bpd_configs_sweep.json``) is rewritten after
each row, and rows already in it are left out of the next sweep, so a study may be run in parts::

    python benchmarks/bench_bpd_configs.py --shards data/fashion-mnist-shards --minutes 30 \\
        --rows simple hybrid vlb_is --schedules linear cosine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from cli import bench_parser, require_at_least
from machine import machine_info
from mlflow import MlflowClient
from report import build_report, load_average_1m, read_figures, write_report
from table import Column, format_table

from pipelines.data import storage
from pipelines.evaluation.job import EvalSettings, evaluate
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import load_config
from pipelines.training.tags import MODEL_URI_TAG
from pipelines.tuning.driver import SweepRequest, run_sweep
from pipelines.tuning.spec import SweepSpec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_bpd_configs"
SWEEP = ROOT / "configs" / "sweeps" / "bpd_configs.yaml"
SCHEDULE_KEY = "diffusion.schedule"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.set_defaults(output=ROOT / "benchmarks" / "results" / f"{SCRIPT}_sweep.json")
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--sweep", default=str(SWEEP), help="the study's sweep YAML (its variants are the rows)")
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"))
    parser.add_argument("--storage", default=str(ROOT / "outputs" / "bench_bpd_runs"), help="train.storage_path")
    parser.add_argument("--rows", nargs="+", default=None, help="variants of the sweep (default: all)")
    parser.add_argument("--schedules", nargs="+", default=None, choices=("linear", "cosine"),
                        help="noise schedules (default: the sweep's grid)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time per trial")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="train.total_steps (the budget ends first)")
    parser.add_argument("--test-images", type=int, default=1000, help="first N test images for the bound")
    parser.add_argument("--estimate", type=int, default=16, help="K, timesteps per image of the estimated bound")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors of the evaluation")
    parser.add_argument("--name", default=None, help="the sweep's name (default bpd-configs-<time>)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every trial (e.g. train.fd_every=0 for a quick try)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes={args.minutes} must be > 0")
    require_at_least(parser, args, {"test_images": 1, "estimate": 2, "workers": 0})
    return args


def study_spec(raw: Mapping[str, Any], rows: Sequence[str] | None, schedules: Sequence[str] | None,
               done: Sequence[str], minutes: float, max_steps: int) -> SweepSpec:
    """The study's sweep with one variant per (row, schedule) pair, named ``<row>-<schedule>``, leaving
    out the pairs in ``done``, and the budget ``--minutes`` / ``--max-steps``.

    Raises:
        ValueError: a row that is not a variant of the sweep, or nothing left to run.
    """
    variants = dict(raw.get("variants") or {})
    unknown = sorted(set(rows or ()) - set(variants))
    if unknown:
        raise ValueError(f"--rows {unknown} are not variants of the sweep; it has {list(variants)}")
    grid = (raw.get("search_space") or {}).get(SCHEDULE_KEY, {}).get("grid_search", ["linear"])
    pairs = {f"{row}-{schedule}": {**variants[row], SCHEDULE_KEY: schedule}
             for row in (rows or variants) for schedule in (schedules or grid)}
    left = {name: overrides for name, overrides in pairs.items() if name not in done}
    if not left:
        raise ValueError("every requested row is in the results already")
    space = {k: v for k, v in (raw.get("search_space") or {}).items() if k != SCHEDULE_KEY}
    return spec_from_dict({**raw, "variants": left, "search_space": space,
                           "budget": {"train.max_minutes": minutes, "train.total_steps": max_steps}})


def score_trial(row: Mapping[str, Any], client: MlflowClient, shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """One trial of the sweep (a results row of ``pipelines.tuning``) scored on the test split."""
    trained = client.get_run(row["run_id"]).data
    model_uri = trained.tags[MODEL_URI_TAG]
    params = trained.params
    scored = evaluate(EvalSettings(model=model_uri, shards=shards, split="test", images=args.test_images,
                                   estimate=args.estimate, workers=args.workers, samples=0, threads=1))
    metrics = scored["metrics"]
    return {
        "row": row["variant"], "trial_id": row["trial_id"], "outcome": row["outcome"], "steps": row["step"],
        "loss": params["diffusion.loss"], "variance": params["diffusion.variance"],
        "schedule": params["diffusion.schedule"], "timestep_sampler": params["train.timestep_sampler"],
        "test_images": args.test_images, "estimate_k": args.estimate,
        "test_bpd": metrics["eval_bpd_estimate"], "test_bpd_stderr_images": metrics["eval_bpd_estimate_stderr_images"],
        "test_bpd_stderr_timesteps": metrics["eval_bpd_estimate_stderr"],
        "prior_bpd": metrics.get("eval_bpd_estimate_prior"), "terms_bpd": metrics.get("eval_bpd_estimate_terms"),
        "decoder_bpd": metrics.get("eval_bpd_estimate_decoder"),
        # the run's latest value of each (None when it never logged it)
        "fd": trained.metrics.get("fd"), "fd_floor": trained.metrics.get("fd_floor"),
        "val_bpd": trained.metrics.get("val_bpd"),
        "model_uri": model_uri, "train_run_id": row["run_id"], "eval_run_id": scored["run_id"],
    }


COLUMNS = (
    Column("row", "row"), Column("loss", "loss"), Column("variance", "variance"), Column("schedule", "schedule"),
    Column("sampler", "timestep_sampler"), Column("steps", "steps"), Column("test bpd", "test_bpd", ".4f"),
    Column("s.e.", "test_bpd_stderr_images", ".3f"), Column("L_0", "decoder_bpd", ".3f"), Column("FD", "fd", ".2f"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """Text table of the rows."""
    return format_table(rows, COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    output = Path(args.output)
    done = {r["row"]: r for r in (read_figures(output)["rows"] if output.is_file() else [])}
    shards = storage.resolve(args.shards).uri  # absolute: Ray Train workers run in another directory
    base = load_config(args.config, args.set).replace({
        "data.shards": shards, "train.storage_path": storage.resolve(args.storage).uri, "train.run_name": None})
    sweep_text = Path(args.sweep).read_text()
    spec = study_spec(yaml.safe_load(sweep_text), args.rows, args.schedules, list(done), args.minutes, args.max_steps)
    spec.check_against(base)
    load_start = load_average_1m()
    name = args.name or f"bpd-configs-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.monotonic()
    outcome = run_sweep(SweepRequest(base=base, spec=spec, name=name, sweep_text=sweep_text))
    sweep_minutes = (time.monotonic() - started) / 60
    client = MlflowClient(resolve_tracking_uri())
    for trial in outcome["rows"]:
        if not trial["model_uri"]:
            print(f"{trial['variant']}: trial {trial['trial_id']} {trial['outcome']} without a model "
                  f"({trial['error'] or 'no error'}); not scored", flush=True)
            continue
        row = score_trial(trial, client, shards, args)
        machine = {**machine_info(torch.device("cpu")), "load_average_1m": {"start": load_start, "end": load_average_1m()}}
        done[row["row"]] = row = {**row, "machine": machine, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        figures = {"config": args.config, "sweep": args.sweep, "sweep_name": name,
                   "sweep_parent_run_id": outcome["parent_run_id"], "sweep_minutes": sweep_minutes,
                   "minutes": args.minutes, "shards": str(Path(args.shards).resolve()), "rows": list(done.values())}
        # after every row: a long study keeps what it measured
        write_report(output, build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures))
        print(table([row]), flush=True)
    print(table(list(done.values())))
    print(f"wrote {output.resolve()}")


if __name__ == "__main__":
    main()
