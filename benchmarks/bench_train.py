"""Training throughput of the Ray Train job against a plain single-process PyTorch loop.

Both run the same step (``pipelines.train_loop.train_step``: per-example noise, loss, backward,
clipping, Adam, EMA) on the same model (``configs/fashion_mnist.yaml`` by default), batch size,
torch thread count and shards. The plain loop reads the shards with pyarrow into memory
(``read_split_numpy``) and slices batches; the Ray job is the real ``pipelines.train.run`` with one
worker fed by Ray Data (``iter_torch_batches``) and MLflow tracking on (into a temporary SQLite
store). Throughput is measured over whole logging windows after a warm-up window, from the
``images_per_s`` metric of each window (wall time of the window's steps, data loading included).
The plain loop runs before and after the Ray job, to bracket drifts in machine load, and once more
beside an idle local Ray node (no job), which separates the cost of Ray's resident processes (GCS,
raylet, agents, idle workers) from that of the Train job's own actors and worker.

    python benchmarks/bench_train.py --shards data/fashion-mnist-shards --threads 1 2

Prints a table and writes ``benchmarks/results/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_train.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"),
                        help="preprocessed shard folder (pipelines/preprocess.py)")
    parser.add_argument("--window", type=int, default=10, help="steps per measured window")
    parser.add_argument("--windows", type=int, default=3, help="measured windows (after one warm-up window)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to measure, each a full comparison (default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if min(args.window, args.windows, *(args.threads or [1])) < 1:
        parser.error("--window, --windows and --threads must be >= 1")
    return args


def bench_config(args: argparse.Namespace, threads: int | None, storage: str) -> Any:
    """The config under test: one CPU worker, nothing but training and loss logging."""
    from pipelines.train_config import load_config

    config = load_config(args.config)
    overrides = {
        "data.shards": str(Path(args.shards).resolve()),
        "train.total_steps": args.window * (args.windows + 1), "train.log_every": args.window,
        "train.checkpoint_every": args.window * (args.windows + 1), "train.sample_every": 0, "train.bpd_every": 0,
        "train.final_bpd_images": 0, "train.storage_path": storage, "train.run_name": f"bench-{int(time.time())}",
        "scaling.num_workers": 1, "scaling.use_gpu": False, "scaling.max_failures": 0,
        "tracking.registered_model_name": None, "tracking.experiment_name": "bench-train",
    }
    if threads:
        overrides["scaling.torch_threads"] = threads
    if args.batch:
        overrides["train.global_batch_size"] = args.batch
    return config.replace(overrides)


def plain_loop(config: Any) -> list[float]:
    """images/s of each window of a single-process loop over in-memory shards (first window dropped)."""
    from diffusion_core.diffusion import GaussianDiffusion
    from diffusion_core.unet import UNet
    from pipelines.ema import EMA
    from pipelines.shards import read_split_numpy
    from pipelines.train_loop import Trainee, Window, build_optimizer, configure_torch, train_step

    device = torch.device("cpu")
    configure_torch(config.scaling, device)
    images, _ = read_split_numpy(config.data.shards, "train")
    data = torch.from_numpy(images)
    torch.manual_seed(config.train.seed)
    net = UNet(config.model)
    trainee = Trainee(model=net, net=net, ema=EMA(net, config.train.ema_decay, warmup=config.train.ema_warmup),
                      optimizer=build_optimizer(net.parameters(), config.optimizer), step=0)
    diffusion = GaussianDiffusion(config.diffusion)
    batch, window, rates = config.per_worker_batch_size, Window(diffusion.num_timesteps, device), []
    start = 0
    while trainee.step < config.train.total_steps:
        if start + batch > len(data):
            start = 0
        losses, t, grad_norm = train_step(trainee, diffusion, data[start : start + batch], config, bf16=False)
        start += batch
        window.add(losses, t, grad_norm)
        if trainee.step % config.train.log_every == 0:
            rates.append(window.reduce(1)["images_per_s"])
    return rates[1:]


def start_ray(config: Any) -> None:
    """A fresh local Ray node for one measurement: the worker's CPUs plus one for Ray Data."""
    import ray

    ray.init(address="local", num_cpus=int(config.scaling.cpus_per_worker) + 1, include_dashboard=False,
             log_to_driver=False)


def plain_loop_beside_idle_ray(config: Any) -> list[float]:
    """``plain_loop`` while an idle local Ray node (GCS, raylet, agents, idle workers; no job) runs
    on the same machine: the share of the gap that is Ray's mere presence, not the Train job."""
    import ray

    start_ray(config)
    try:
        return plain_loop(config)
    finally:
        ray.shutdown()


def ray_job(config: Any) -> list[float]:
    """images/s of each window of the real Ray Train job (first window dropped), from MLflow."""
    import ray
    from mlflow import MlflowClient

    from pipelines.mlflow_setup import resolve_tracking_uri
    from pipelines.train import run

    start_ray(config)
    try:
        outcome = run(config)
    finally:
        ray.shutdown()
    history = MlflowClient(resolve_tracking_uri()).get_metric_history(outcome["mlflow_run_id"], "images_per_s")
    return [m.value for m in sorted(history, key=lambda m: m.step)][1:]


def mean_rate(rates: list[float], window: int, batch: int) -> float:
    """Images/s over all windows together (total images / total seconds)."""
    return len(rates) * window * batch / sum(window * batch / r for r in rates)


def measure(args: argparse.Namespace, threads: int | None, tmp: str) -> dict[str, Any]:
    """Plain loop, plain loop beside an idle Ray node, Ray job, plain loop again for one thread
    count; the numbers as a dict."""
    config = bench_config(args, threads, f"{tmp}/runs-{threads}")
    load_before = os.getloadavg()
    plain_before = plain_loop(config)
    idle_ray = plain_loop_beside_idle_ray(config)
    ray_rates = ray_job(config)
    plain_after = plain_loop(config)
    load_after = os.getloadavg()
    batch = config.per_worker_batch_size
    before, after = mean_rate(plain_before, args.window, batch), mean_rate(plain_after, args.window, batch)
    plain = mean_rate(plain_before + plain_after, args.window, batch)
    ray_rate = mean_rate(ray_rates, args.window, batch)
    idle_rate = mean_rate(idle_ray, args.window, batch)
    return {
        "torch_threads": config.scaling.torch_threads, "batch": batch,
        "plain_images_per_s": {"before": plain_before, "after": plain_after, "mean_before": before,
                               "mean_after": after, "mean": plain},
        "plain_beside_idle_ray_images_per_s": {"windows": idle_ray, "mean": idle_rate},
        "ray_images_per_s": {"windows": ray_rates, "mean": ray_rate},
        "ratio_ray_over_plain": ray_rate / plain,
        "ratio_plain_beside_idle_ray_over_plain": idle_rate / plain,
        "ratio_ray_over_plain_before": ray_rate / before, "ratio_ray_over_plain_after": ray_rate / after,
        "load_average_1m": {"start": load_before[0], "end": load_after[0]},
    }


def print_table(results: list[dict[str, Any]]) -> None:
    """One row per (thread count, loop), then the ratios."""
    print(f"{'threads':>7}  {'loop':<24}{'images/s':>10}   windows")
    for r in results:
        plain, ray_, idle = r["plain_images_per_s"], r["ray_images_per_s"], r["plain_beside_idle_ray_images_per_s"]
        for label, mean, windows in (("plain PyTorch (before)", plain["mean_before"], plain["before"]),
                                     ("plain, idle Ray node by", idle["mean"], idle["windows"]),
                                     ("Ray Train + Ray Data", ray_["mean"], ray_["windows"]),
                                     ("plain PyTorch (after)", plain["mean_after"], plain["after"])):
            print(f"{r['torch_threads']:>7}  {label:<24}{mean:>10.2f}   {[round(w, 2) for w in windows]}")
    for r in results:
        print(f"threads {r['torch_threads']}: ratio Ray / plain {r['ratio_ray_over_plain']:.3f} (target >= 0.95; "
              f"vs before {r['ratio_ray_over_plain_before']:.3f}, vs after {r['ratio_ray_over_plain_after']:.3f}), "
              f"batch {r['batch']}, load average {r['load_average_1m']['start']:.1f} -> "
              f"{r['load_average_1m']['end']:.1f}; plain beside an idle Ray node / plain "
              f"{r['ratio_plain_beside_idle_ray_over_plain']:.3f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run both loops for each thread count, print the table, write the JSON; returns the exit code."""
    args = parse_args(argv)
    from pipelines.shards import load_manifest

    try:
        manifest = load_manifest(str(Path(args.shards).resolve()))
    except ValueError as err:
        print(f"error: {err}\nmake shards with: python pipelines/preprocess.py --input "
              "/work/shared/data/fashion-mnist/train-images-idx3-ubyte.gz --output data/fashion-mnist-shards",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        results = [measure(args, threads, tmp) for threads in (args.threads or [None])]
    summary = {
        "config": str(Path(args.config).resolve()), "shards": str(Path(args.shards).resolve()),
        "train_images": manifest.counts["train"], "window_steps": args.window, "windows": args.windows,
        "target_ratio": 0.95, "results": results,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
    }
    print_table(results)
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
