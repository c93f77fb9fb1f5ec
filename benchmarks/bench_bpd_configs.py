"""Which training config gives the best test-set bits/dim at equal training wall time.

Each row trains ``--config`` (default ``configs/fashion_mnist.yaml``) with the row's overrides for
``--minutes`` of training wall time (``train.max_minutes``; ``train.total_steps`` is raised so that
the budget ends the run), on the local Ray cluster (or ``$RAY_ADDRESS``), then scores its
registered EMA model on the first ``--test-images`` images of the shards' ``test`` split with the
estimated bound (``--estimate`` K stratified timesteps per image, over ``--workers`` Ray actors;
``evaluation.job.evaluate``, logged as an evaluation run). The rows:

* ``simple``: the config as it is (simple loss, fixed_small variance: the bound's variances are
  not learned);
* ``hybrid``: L_simple + 0.001 L_vlb with ``learned_range`` variances (Nichol & Dhariwal 2021, sec. 3.1);
* ``vlb_is``: L_vlb alone with ``learned_range`` and importance-sampled timesteps
  (``train.timestep_sampler: loss_second_moment``, Nichol & Dhariwal 2021, sec. 3.3);
* ``other_schedule``: the better of ``hybrid`` and ``vlb_is`` (lower test bits/dim; both must be in
  the JSON already) with the other noise schedule (cosine for a linear config, and back).

A row's figures: steps reached, training minutes, the bound (total, its standard error over
images, L_T / sum of L_t / L_0), the last ``fd`` and ``fd_floor`` the run logged, and the model's URI.
The JSON (default ``benchmarks/results/bench_bpd_configs.json``) is rewritten after each row, and rows
already in it are skipped, so the rows may be run one invocation (or one session) at a time::

    python benchmarks/bench_bpd_configs.py --shards data/fashion-mnist-shards --minutes 30 \\
        --rows simple hybrid vlb_is other_schedule
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from cli import bench_parser, require_at_least
from machine import machine_info
from mlflow import MlflowClient
from report import build_report, load_average_1m, read_figures, write_report
from table import Column, format_table

from pipelines.data import storage
from pipelines.evaluation.job import EvalSettings, evaluate
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import TrainConfig, load_config
from pipelines.training.launcher import run
from pipelines.training.tags import MODEL_URI_TAG

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_bpd_configs"
LEARNED = {"diffusion.variance": "learned_range", "model.out_channels": 2}
ROWS: dict[str, dict[str, Any]] = {
    "simple": {},
    "hybrid": {"diffusion.loss": "hybrid", **LEARNED},
    "vlb_is": {"diffusion.loss": "vlb", **LEARNED, "train.timestep_sampler": "loss_second_moment"},
}
ROW_NAMES = (*ROWS, "other_schedule")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"))
    parser.add_argument("--storage", default=str(ROOT / "outputs" / "bench_bpd_runs"), help="train.storage_path")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES))
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time per row")
    parser.add_argument("--max-steps", type=int, default=1_000_000, help="train.total_steps (the budget ends first)")
    parser.add_argument("--test-images", type=int, default=1000, help="first N test images for the bound")
    parser.add_argument("--estimate", type=int, default=16, help="K, timesteps per image of the estimated bound")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors of the evaluation")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every row (e.g. train.fd_every=0 for a quick try)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes={args.minutes} must be > 0")
    require_at_least(parser, args, {"test_images": 1, "estimate": 2, "workers": 0})
    return args


def row_overrides(name: str, done: dict[str, dict[str, Any]], base: TrainConfig) -> dict[str, Any]:
    """The row's ``{"section.key": value}`` overrides (``other_schedule``: from the rows in ``done``).

    Raises:
        ValueError: for ``other_schedule`` before both ``hybrid`` and ``vlb_is`` are measured.
    """
    if name in ROWS:
        return dict(ROWS[name])
    if not {"hybrid", "vlb_is"} <= set(done):
        raise ValueError("other_schedule needs the hybrid and vlb_is rows first (run them, or list them before it)")
    better = min(("hybrid", "vlb_is"), key=lambda row: done[row]["test_bpd"])
    other = "cosine" if base.diffusion.schedule == "linear" else "linear"
    return {**ROWS[better], "diffusion.schedule": other}


def run_row(name: str, overrides: dict[str, Any], base: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train one row for ``--minutes`` and score its registered model on the test split."""
    shards = storage.resolve(args.shards).uri  # absolute: Ray Train workers run in another directory
    config = base.replace({**overrides, "data.shards": shards, "train.storage_path": storage.resolve(args.storage).uri,
                           "train.total_steps": args.max_steps, "train.max_minutes": args.minutes,
                           "train.run_name": f"bpd-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                           "tracking.registered_model_name": f"{base.tracking.registered_model_name}-bpd-{name}"})
    started = time.monotonic()
    outcome = run(config)
    wall = time.monotonic() - started
    trained = MlflowClient(resolve_tracking_uri()).get_run(outcome["mlflow_run_id"]).data  # read once
    model_uri = trained.tags[MODEL_URI_TAG]
    scored = evaluate(EvalSettings(model=model_uri, shards=shards, split="test", images=args.test_images,
                                   estimate=args.estimate, workers=args.workers, samples=0, threads=1))
    metrics = scored["metrics"]
    return {
        "row": name, "overrides": overrides, "steps": int(outcome["metrics"]["step"]), "job_minutes": wall / 60,
        "loss": config.diffusion.loss, "variance": config.diffusion.variance, "schedule": config.diffusion.schedule,
        "timestep_sampler": config.train.timestep_sampler, "test_images": args.test_images, "estimate_k": args.estimate,
        "test_bpd": metrics["eval_bpd_estimate"], "test_bpd_stderr_images": metrics["eval_bpd_estimate_stderr_images"],
        "test_bpd_stderr_timesteps": metrics["eval_bpd_estimate_stderr"],
        "prior_bpd": metrics.get("eval_bpd_estimate_prior"), "terms_bpd": metrics.get("eval_bpd_estimate_terms"),
        "decoder_bpd": metrics.get("eval_bpd_estimate_decoder"),
        # the run's latest value of each (None when it never logged it)
        "fd": trained.metrics.get("fd"), "fd_floor": trained.metrics.get("fd_floor"),
        "val_bpd": trained.metrics.get("val_bpd"),
        "model_uri": model_uri, "train_run_id": outcome["mlflow_run_id"], "eval_run_id": scored["run_id"],
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
    base = load_config(args.config, args.set)
    output = Path(args.output)
    done = {r["row"]: r for r in (read_figures(output)["rows"] if output.is_file() else [])}
    for name in args.rows:
        if name in done:
            print(f"{name}: already in {output}, skipped", flush=True)
            continue
        load_start = load_average_1m()
        row = run_row(name, row_overrides(name, done, base), base, args)
        machine = {**machine_info(torch.device("cpu")), "load_average_1m": {"start": load_start, "end": load_average_1m()}}
        done[name] = row = {**row, "machine": machine, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        figures = {"config": args.config, "minutes": args.minutes, "shards": str(Path(args.shards).resolve()),
                   "rows": list(done.values())}
        # after every row: a long run keeps what it measured
        write_report(output, build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures))
        print(table([row]), flush=True)
    print(table(list(done.values())))
    print(f"wrote {output.resolve()}")


if __name__ == "__main__":
    main()
