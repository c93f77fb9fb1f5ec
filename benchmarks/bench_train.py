"""Training throughput of the Ray Train job against a plain single-process PyTorch loop.

Both run the same step (``pipelines.training.step.train_step``: per-example noise, loss, backward,
clipping, Adam, EMA) on the same model (``configs/fashion_mnist.yaml`` by default), batch size,
torch thread count and shards. The plain loop reads the shards with pyarrow into memory
(``read_split_numpy``) and slices batches; the Ray job is the real ``pipelines.training.launcher.run`` with one
worker fed by Ray Data (``iter_torch_batches``) and MLflow tracking on (into a temporary SQLite
store). Throughput is measured over whole logging windows after a warm-up window, from the
``images_per_s`` metric of each window (wall time of the window's steps, data loading included).
The plain loop runs before and after the Ray job, to bracket drifts in machine load, and once more
beside an idle local Ray node (no job), which separates the cost of Ray's resident processes (GCS,
raylet, agents, idle workers) from that of the Train job's own actors and worker. With more than one
thread, the Ray job also runs data-parallel with the same threads in total: one single-threaded worker
per thread (DDP over gloo), each with its share of the same global batch. A background sampler
(``cpu_sampler.py``) records every process's CPU time, so each loop also reports the cores its training
used over the measured windows and the cores every other process on the machine used meanwhile, in all
and per process (Ray's daemons and each actor: where Ray's overhead goes).

    python benchmarks/bench_train.py --shards data/fashion-mnist-shards --threads 1 2

``--precision fp32 bf16`` runs the whole comparison once per precision (``scaling.precision``: fp32, or
bf16 autocast in the step, the bfloat16 format of Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep
Learning Training"; weights, optimizer state and the loss reduction stay fp32), so the real loop's
images/s in bf16 and in fp32 come from one run on the same machine state.

Prints a table and writes ``benchmarks/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import torch
from cli import add_threads, bench_parser, require_at_least
from cpu_sampler import CpuSampler
from machine import machine_info
from mlflow import MlflowClient
from report import build_report, load_average_1m, write_report
from table import Column, print_table

from diffusion_core.diffusion import GaussianDiffusion
from pipelines.common.ray_auth import init_local_ray
from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import load_config
from pipelines.training.launcher import run
from pipelines.training.step import train_step
from pipelines.training.trainee import build_trainee
from pipelines.training.window import Window
from pipelines.training.worker import Worker, configure_torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_train"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"),
                        help="preprocessed shard folder (pipelines/preprocess.py)")
    parser.add_argument("--window", type=int, default=10, help="steps per measured window")
    parser.add_argument("--windows", type=int, default=3, help="measured windows (after one warm-up window)")
    add_threads(parser, None, many=True,
                help="torch thread counts to measure, each a full comparison (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="scaling.precision of both loops, each a full comparison (default: fp32)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"window": 1, "windows": 1, "threads": 1})
    return args


def bench_config(args: argparse.Namespace, threads: int | None, storage: str, precision: str = "fp32") -> Any:
    """The config under test: one worker reserving one CPU, nothing but training and loss logging, in
    ``precision`` ("fp32" or "bf16", ``scaling.precision``)."""
    config = load_config(args.config)
    overrides = {
        "data.shards": str(Path(args.shards).resolve()),
        "train.total_steps": args.window * (args.windows + 1), "train.log_every": args.window,
        "train.checkpoint_every": args.window * (args.windows + 1), "train.sample_every": 0, "train.bpd_every": 0,
        "train.final_bpd_images": 0, "train.storage_path": storage, "train.run_name": f"bench-{int(time.time())}",
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 1.0, "scaling.use_gpu": False, "scaling.max_failures": 0,
        "scaling.precision": precision,
        "tracking.registered_model_name": None, "tracking.experiment_name": "bench-train",
    }
    if threads:
        overrides["scaling.torch_threads"] = threads
    if args.batch:
        overrides["train.global_batch_size"] = args.batch
    return config.replace(overrides)


def plain_loop(config: Any) -> tuple[list[float], list[float]]:
    """A single-process loop over in-memory shards: images/s of each window and the Unix time at
    the end of each window (first window's rate dropped as warm-up; its end time kept, as the start
    of the measured period)."""
    device = torch.device("cpu")
    bf16 = configure_torch(config.scaling, device)
    images, _ = read_split_numpy(config.data.shards, "train")
    data = torch.from_numpy(images)
    trainee = build_trainee(config, Worker(rank=0, world_size=1, device=device), None, prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    batch, window, rates, ends = config.per_worker_batch_size, Window(diffusion.num_timesteps, device), [], []
    start = 0
    while trainee.step < config.train.total_steps:
        if start + batch > len(data):
            start = 0
        losses, t, grad_norm = train_step(trainee, diffusion, data[start : start + batch], config, bf16=bf16)
        start += batch
        window.add(losses, t, grad_norm)
        if trainee.step % config.train.log_every == 0:
            rates.append(window.reduce(1)["images_per_s"])
            ends.append(time.time())
    return rates[1:], ends


def start_ray(config: Any) -> None:
    """A fresh local Ray node for one measurement: the workers' CPUs plus one for Ray Data."""
    cpus = math.ceil(config.scaling.num_workers * config.scaling.cpus_per_worker) + 1
    init_local_ray(num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # token auth on


def plain_loop_beside_idle_ray(config: Any) -> tuple[list[float], list[float]]:
    """``plain_loop`` while an idle local Ray node (GCS, raylet, agents, idle workers; no job) runs
    on the same machine: the share of the gap that is Ray's mere presence, not the Train job."""
    start_ray(config)
    try:
        return plain_loop(config)
    finally:
        ray.shutdown()


def ray_job(config: Any) -> tuple[list[float], list[float]]:
    """The real Ray Train job: images/s of each window (first dropped) from MLflow, and the Unix
    time each window was logged (rank 0, right after the window's last step)."""
    start_ray(config)
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    history = MlflowClient(resolve_tracking_uri()).get_metric_history(outcome["mlflow_run_id"], "images_per_s")
    history = sorted(history, key=lambda m: m.step)
    return [m.value for m in history][1:], [m.timestamp / 1000 for m in history]


#: Ray's node processes, by a piece of their command line (the rest are named by ``ray::<Actor>``).
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard/agent.py", "runtime_env/agent", "log_monitor.py", "monitor.py",
               "dashboard/dashboard.py")


def process_label(proc: Any) -> str:
    """A short name for a process: ``ray::<Actor or task>`` for Ray workers, the matching
    ``RAY_DAEMONS`` entry for Ray's node processes, else the executable's name."""
    command = " ".join(proc.cmdline())
    if command.startswith("ray::"):
        return command.split()[0]
    return next((daemon for daemon in RAY_DAEMONS if daemon in command), proc.name())


def classify(ray_training: bool) -> Callable[[Any], str]:
    """Groups for ``CpuSampler``: "training" is this process (plain loop) or the Ray Train
    workers (Ray job); every other process on the machine is grouped by ``process_label``."""
    me = os.getpid()

    def group(proc: Any) -> str:
        label = process_label(proc)
        training = "RayTrainWorker" in label if ray_training else proc.pid == me
        return "training" if training else label

    return group


def timed(loop: Callable[[Any], tuple[list[float], list[float]]], config: Any, ray_training: bool) -> dict[str, Any]:
    """Run one loop under a ``CpuSampler``: its windows' images/s and the cores that the training
    and everything else used over the measured windows (the others also per process, those above
    0.002 cores)."""
    with CpuSampler(classify(ray_training)) as sampler:
        rates, ends = loop(config)
    cores = sampler.cores_between(ends[0], ends[-1])
    training = cores.pop("training", 0.0)
    by_process = {name: round(used, 4) for name, used in sorted(cores.items(), key=lambda kv: -kv[1]) if used >= 0.002}
    return {"windows": rates, "cores": {"training": training, "other": sum(cores.values()),
                                        "other_by_process": by_process}}


def mean_rate(rates: list[float], window: int, batch: int) -> float:
    """Images/s over all windows together (total images / total seconds)."""
    return len(rates) * window * batch / sum(window * batch / r for r in rates)


def measure(args: argparse.Namespace, threads: int | None, tmp: str, precision: str = "fp32") -> dict[str, Any]:
    """For one thread count and precision: plain loop, plain loop beside an idle Ray node, Ray job with
    one worker, Ray job with one single-threaded worker per thread (if threads > 1), plain loop again;
    images/s, cores used, and ratios to the plain loop (before and after averaged)."""
    config = bench_config(args, threads, f"{tmp}/runs-{threads}-{precision}", precision)
    load_start = load_average_1m()
    loops = {"plain_before": timed(plain_loop, config, False),
             "plain_beside_idle_ray": timed(plain_loop_beside_idle_ray, config, False),
             "ray": timed(ray_job, config, True)}
    torch_threads = config.scaling.torch_threads or 0
    if torch_threads > 1:
        spread = config.replace({"scaling.num_workers": torch_threads, "scaling.cpus_per_worker": 1.0 / torch_threads,
                                 "scaling.torch_threads": 1,
                                 "train.run_name": f"{config.train.run_name}-dp"})
        loops["ray_data_parallel"] = timed(ray_job, spread, True)
    loops["plain_after"] = timed(plain_loop, config, False)
    batch = config.per_worker_batch_size
    for loop in loops.values():
        loop["mean"] = mean_rate(loop["windows"], args.window, batch)
    plain = mean_rate(loops["plain_before"]["windows"] + loops["plain_after"]["windows"], args.window, batch)
    return {
        "torch_threads": torch_threads, "precision": precision, "batch": batch, "loops": loops, "plain_mean": plain,
        "ratios_over_plain": {name: loop["mean"] / plain for name, loop in loops.items()},
        "load_average_1m": {"start": load_start, "end": load_average_1m()},
    }


LABELS = {"plain_before": "plain PyTorch (before)", "plain_beside_idle_ray": "plain, idle Ray node by",
          "ray": "Ray Train, 1 worker", "ray_data_parallel": "Ray Train, 1 thread/wkr",
          "plain_after": "plain PyTorch (after)"}


COLUMNS = (
    Column("threads", "threads"), Column("precision", "precision", align="<"), Column("loop", "loop", align="<"), Column("images/s", "mean", ".2f"),
    Column("/ plain", "ratio", ".3f"), Column("train cores", "training_cores", ".2f"),
    Column("other cores", "other_cores", ".2f"), Column("windows", "windows", align="<"),
)


def show(results: list[dict[str, Any]]) -> None:
    """One row per (thread count, loop): images/s, ratio to the plain loop, cores used by the
    training and by every other process over the measured windows; then the windows."""
    print_table([{"threads": r["torch_threads"], "precision": r.get("precision", "fp32"), "loop": LABELS[name], "mean": loop["mean"],
                  "ratio": r["ratios_over_plain"][name], "training_cores": loop["cores"]["training"],
                  "other_cores": loop["cores"]["other"], "windows": str([round(w, 1) for w in loop["windows"]])}
                 for r in results for name, loop in r["loops"].items()], COLUMNS)
    for r in results:
        for name, loop in r["loops"].items():
            if name.startswith("ray"):
                top = ", ".join(f"{proc} {used:.3f}" for proc, used in list(loop["cores"]["other_by_process"].items())[:8])
                print(f"{'':>9}other cores during {LABELS[name]}: {top}")
        print(f"threads {r['torch_threads']}, {r.get('precision', 'fp32')}: target Ray / plain >= 0.95; plain = mean of before and after "
              f"({r['plain_mean']:.2f}); batch {r['batch']}; load average {r['load_average_1m']['start']:.1f} -> "
              f"{r['load_average_1m']['end']:.1f}")


def precision_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per thread count measured in both precisions: each loop's bf16 images/s over its fp32 images/s
    (``{}`` unless both were measured)."""
    by_key = {(r["torch_threads"], r["precision"]): r for r in results}
    return {str(threads): {name: by_key[(threads, "bf16")]["loops"][name]["mean"] / loop["mean"]
                           for name, loop in by_key[(threads, "fp32")]["loops"].items()}
            for threads, precision in by_key if precision == "fp32" and (threads, "bf16") in by_key}


def main(argv: Sequence[str] | None = None) -> int:
    """Run both loops for each thread count, print the table, write the JSON; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        manifest = load_manifest(str(Path(args.shards).resolve()))
    except ValueError as err:
        print(f"error: {err}\nmake shards with: python pipelines/preprocess.py --input "
              "/work/shared/data/fashion-mnist/train-images-idx3-ubyte.gz --output data/fashion-mnist-shards",
              file=sys.stderr)
        return 2
    load_start = load_average_1m()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        results = [measure(args, threads, tmp, precision)
                   for precision in args.precision for threads in (args.threads or [None])]
    figures = {
        "config": str(Path(args.config).resolve()), "shards": str(Path(args.shards).resolve()),
        "train_images": manifest.counts["train"], "window_steps": args.window, "windows": args.windows,
        "target_ratio": 0.95, "results": results, "bf16_over_fp32": precision_ratios(results),
    }
    show(results)
    for threads, ratios in figures["bf16_over_fp32"].items():
        print(f"threads {threads}: bf16 / fp32 images/s: " + ", ".join(f"{LABELS[k]} {v:.3f}" for k, v in ratios.items()))
    report = build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures)
    print(f"wrote {write_report(args.output, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
