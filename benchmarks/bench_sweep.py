"""The per-trial overhead of a sweep: the same config trained as a plain ``pipelines/train.py`` run
(``training.launcher.run``) and as the only trial of a ``pipelines/sweep.py`` sweep
(``tuning.driver.run_sweep``, FIFO), in pairs on the same Ray cluster, in alternating order.

Per run: the training throughput (images/s: the median of the run's logged ``images_per_s`` windows,
the first window left out as warm-up) and the end-to-end rate (``steps x train.global_batch_size``
over the wall time of the whole call: checks, Ray Train start, Tune's trial, MLflow, the final model).
The figures are each pair's sweep / plain ratios and their medians::

    python benchmarks/bench_sweep.py --config configs/tiny_cpu.yaml --steps 200 --pairs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from cli import bench_parser, require_at_least
from machine import machine_info
from mlflow import MlflowClient
from report import build_report, load_average_1m, write_report
from table import Column, format_table

from pipelines.common.ray_auth import init_local_ray
from pipelines.data import storage
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import TrainConfig, load_config
from pipelines.training.launcher import run
from pipelines.tuning.driver import SweepRequest, run_sweep
from pipelines.tuning.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_sweep"
#: What a comparison of training throughput leaves out: grids, bits/dim, FD, system metrics.
QUIET = {"train.sample_every": 0, "train.bpd_every": 0, "train.final_bpd_images": 0, "train.fd_every": 0,
         "tracking.log_system_metrics": False, "tracking.registered_model_name": None}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"))
    parser.add_argument("--storage", default=str(ROOT / "outputs" / "bench_sweep_runs"), help="train.storage_path")
    parser.add_argument("--steps", type=int, default=200, help="train.total_steps of every run")
    parser.add_argument("--pairs", type=int, default=3, help="(plain, sweep) pairs, alternating which goes first")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"steps": 1, "pairs": 1})
    return args


def base_config(args: argparse.Namespace) -> TrainConfig:
    """``--config`` with ``--set``, ``QUIET``, ``--steps`` and absolute paths; logs every 10 steps
    (or at the end), one checkpoint at the end."""
    config = load_config(args.config, args.set)
    log_every = min(10, args.steps)
    return config.replace({**QUIET, "data.shards": storage.resolve(args.shards).uri,
                           "train.storage_path": storage.resolve(args.storage).uri, "train.total_steps": args.steps,
                           "train.log_every": log_every, "train.checkpoint_every": args.steps * log_every,
                           "train.run_name": None})


def rates(client: MlflowClient, run_id: str, images: int, wall_s: float) -> dict[str, float]:
    """``images_per_s`` (median of the run's windows after the first) and ``end_to_end_images_per_s``."""
    history = sorted(client.get_metric_history(run_id, "images_per_s"), key=lambda m: m.step)
    windows = [m.value for m in history[1:]] or [m.value for m in history]
    return {"images_per_s": statistics.median(windows), "end_to_end_images_per_s": images / wall_s, "wall_s": wall_s}


def plain_run(config: TrainConfig, tag: str) -> tuple[str, float]:
    """``launcher.run`` of ``config`` (as ``train.py``); returns ``(MLflow run id, wall seconds)``."""
    started = time.perf_counter()
    outcome = run(config.replace({"train.run_name": f"plain-{tag}"}))
    return outcome["mlflow_run_id"], time.perf_counter() - started


def sweep_run(config: TrainConfig, tag: str) -> tuple[str, float]:
    """A 1-trial FIFO sweep of ``config``; returns ``(the trial's MLflow run id, wall seconds)``."""
    spec = spec_from_dict({"metric": "loss", "max_concurrent_trials": 1, "variants": {"only": {}}})
    started = time.perf_counter()
    outcome = run_sweep(SweepRequest(base=config, spec=spec, name=f"sweep-{tag}", sweep_text="variants: {only: {}}"))
    wall = time.perf_counter() - started
    (trial,) = outcome["rows"]
    if trial["outcome"] != "finished":
        raise RuntimeError(f"the sweep's trial ended {trial['outcome']}: {trial['error']}")
    return trial["run_id"], wall


def measure_pair(config: TrainConfig, index: int, client: MlflowClient) -> dict[str, Any]:
    """One (plain, sweep) pair; the sweep goes first in odd pairs."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{index}"
    images = config.train.total_steps * config.train.global_batch_size
    order: list[tuple[str, Callable[[TrainConfig, str], tuple[str, float]]]] = [("plain", plain_run),
                                                                                 ("sweep", sweep_run)]
    if index % 2:
        order.reverse()
    row: dict[str, Any] = {"pair": index, "first": order[0][0]}
    for kind, launch in order:
        run_id, wall = launch(config, stamp)
        row[kind] = {**rates(client, run_id, images, wall), "run_id": run_id}
    row["ratio"] = row["sweep"]["images_per_s"] / row["plain"]["images_per_s"]
    row["end_to_end_ratio"] = row["sweep"]["end_to_end_images_per_s"] / row["plain"]["end_to_end_images_per_s"]
    return row


COLUMNS = (
    Column("pair", "pair"), Column("first", "first", align="<"),
    Column("plain img/s", lambda r: r["plain"]["images_per_s"], ".1f"),
    Column("sweep img/s", lambda r: r["sweep"]["images_per_s"], ".1f"), Column("ratio", "ratio", ".3f"),
    Column("plain wall s", lambda r: r["plain"]["wall_s"], ".1f"),
    Column("sweep wall s", lambda r: r["sweep"]["wall_s"], ".1f"),
    Column("end-to-end ratio", "end_to_end_ratio", ".3f"),
)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = base_config(args)
    init_local_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)  # token auth on
    client = MlflowClient(resolve_tracking_uri())
    load_start = load_average_1m()
    rows = [measure_pair(config, index, client) for index in range(args.pairs)]
    figures = {"config": args.config, "steps": args.steps, "global_batch_size": config.train.global_batch_size,
               "num_workers": config.scaling.num_workers, "pairs": rows,
               "median_ratio": statistics.median(r["ratio"] for r in rows),
               "median_end_to_end_ratio": statistics.median(r["end_to_end_ratio"] for r in rows)}
    output = write_report(args.output, build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start,
                                                    figures))
    print(format_table(rows, COLUMNS, title=f"{args.config}, {args.steps} steps: sweep trial / plain train.py run"))
    print(f"median images/s ratio {figures['median_ratio']:.3f}; end-to-end {figures['median_end_to_end_ratio']:.3f}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
