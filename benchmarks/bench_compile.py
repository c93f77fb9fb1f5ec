"""Eager vs ``torch.compile`` (inductor) on this machine's CPU: training step and DDIM-50 sampling.

For the UNet and diffusion of ``configs/fashion_mnist.yaml`` (or ``--config``), in one process, for
each torch thread count of ``--threads`` (``torch.set_num_threads``):

* training images/s: the real training step (``pipelines.training.step.train_step`` on a trainee
  from ``build_trainee``: per-example noise, loss, backward, clipping, Adam, EMA) on batches of the
  preprocessed shards held in memory, with ``scaling.compile`` off and on. The first
  ``--warmup-steps`` steps (the compile included) are not timed; the ``--steps`` after them are.
  ``--rounds`` rounds of (eager, compiled) and a last eager run, interleaved, so that a drift in
  machine load shows in the spread; the medians are compared;
* DDIM-50 sampling images/s at ``--sample-batch`` (``ddim_sample_loop``, no grad, eval mode): the
  eager module and its "compiled" network (``diffusion_core.inference_network``, as evaluation
  builds it). One untimed 2-step loop first (the compile happens there), then one timed full loop,
  best of ``--repeats`` (every network mode of Serve: ``bench_serve.py --compare-networks``);
* agreement: the largest absolute difference between the compiled and the eager network's outputs
  (float32, the same weights and inputs, forward only), with the weights moved off their
  initialisation by N(0, 0.05^2) noise (a fresh UNet's zero-initialised output convolution would
  make both outputs exactly 0); the sampling timings use the same weights.

Prints a table and writes JSON
(default ``benchmarks/results/bench_compile.json``)::

    python benchmarks/bench_compile.py --shards data/fashion-mnist-shards --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from cli import add_threads, bench_parser, require_at_least
from machine import machine_info
from report import build_report, load_average_1m, write_report
from table import Column, format_table
from timing import time_calls

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.inference_network import build_inference_network
from pipelines.data.shards.reader import read_split_numpy
from pipelines.training.config import TrainConfig, load_config
from pipelines.training.step import train_step
from pipelines.training.trainee import build_trainee
from pipelines.training.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_compile"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion_mnist.yaml"))
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"),
                        help="preprocessed shard folder (pipelines/preprocess.py)")
    add_threads(parser, [1, 2], many=True)
    parser.add_argument("--batch", type=int, default=32, help="training batch (the config's per-worker batch: 32)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed training steps (compile included)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps")
    parser.add_argument("--rounds", type=int, default=2,
                        help="training: rounds of (eager, compiled), then eager once more; medians reported")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="timed DDIM loops per variant (best kept)")
    args = parser.parse_args(argv)
    # --warmup-steps >= 1: the first step compiles
    require_at_least(parser, args, dict.fromkeys(("batch", "steps", "sample_batch", "ddim_steps", "repeats", "rounds",
                                                  "threads", "warmup_steps"), 1))
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_config(args: argparse.Namespace, threads: int, compiled: bool) -> TrainConfig:
    """The config's model and diffusion, one single-process worker, ``threads`` torch threads."""
    return args.base_config.replace({
        "data.shards": str(Path(args.shards).resolve()), "train.global_batch_size": args.batch,
        "scaling.num_workers": 1, "scaling.use_gpu": False, "scaling.torch_threads": threads,
        "scaling.compile": compiled,
    })


def time_training(args: argparse.Namespace, data: torch.Tensor, threads: int, compiled: bool) -> dict[str, Any]:
    """Images/s of ``args.steps`` real training steps after ``args.warmup_steps`` untimed ones."""
    config = train_config(args, threads, compiled)
    torch.manual_seed(0)
    trainee = build_trainee(config, Worker(rank=0, world_size=1, device=torch.device("cpu")), None,
                            prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    batches = (data[i * args.batch:(i + 1) * args.batch] for i in range(len(data) // args.batch))
    timing = time_calls(lambda _: train_step(trainee, diffusion, next(batches), config, bf16=False), args.steps,
                        warmup=args.warmup_steps)
    return {"images_per_s": args.batch / timing.mean, "seconds_per_step": timing.mean,
            "first_step_s": timing.first_s, "warmup_s": timing.warmup_s}


def time_ddim(args: argparse.Namespace, diffusion: GaussianDiffusion, net: Callable, shape: tuple) -> dict[str, Any]:
    """Best of ``args.repeats`` full DDIM loops after an untimed 2-step loop (compile / trace)."""
    with torch.no_grad():
        timing = time_calls(lambda i: diffusion.ddim_sample_loop(net, shape, num_steps=args.ddim_steps if i else 2),
                            args.repeats, warmup=1)
    return {"images_per_s": shape[0] / timing.best, "seconds": list(timing.seconds), "warmup_s": timing.warmup_s}


def sampling(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """DDIM images/s of the eager and compiled networks, and the compiled network's largest absolute
    deviation from the eager one."""
    config = train_config(args, threads, False)
    torch.manual_seed(0)
    trainee = build_trainee(config, Worker(rank=0, world_size=1, device=torch.device("cpu")), None,
                            prepare=lambda net: net)
    model = trainee.net.eval()
    with torch.no_grad():  # off the initialisation, whose zero output convolution makes every output 0
        generator = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    diffusion = GaussianDiffusion(config.diffusion)
    shape = (args.sample_batch, *config.model.image_shape)
    compiled = build_inference_network(model, "compiled", config.model.image_shape, "cpu", warmup=()).forward
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = torch.randint(diffusion.num_timesteps, (shape[0],), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        deviation = (compiled(x, t) - model(x, t)).abs().max().item()
    results = {}
    for name, net in (("eager", model), ("compiled", compiled)):
        log(f"  DDIM-{args.ddim_steps} {name}, {threads} thread(s)")
        results[name] = time_ddim(args, diffusion, net, shape)
    results["compiled_vs_eager_max_abs_diff"] = deviation
    return results


def measure(args: argparse.Namespace, data: torch.Tensor, threads: int) -> dict[str, Any]:
    """All measurements at one thread count, training variants interleaved."""
    torch.set_num_threads(threads)
    runs: dict[str, list[dict[str, Any]]] = {"eager": [], "compiled": []}
    order = [("eager", False), ("compiled", True)] * args.rounds + [("eager", False)]
    for name, compiled in order:
        log(f"  training {name} ({len(runs[name]) + 1}), {threads} thread(s)")
        runs[name].append(time_training(args, data, threads, compiled))
        torch._dynamo.reset()
    training = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs),
                       "all_images_per_s": [r["images_per_s"] for r in rs], "runs": rs} for name, rs in runs.items()}
    return {"training": training, "sampling": sampling(args, threads)}


def _median_and_range(run: dict[str, Any]) -> str:
    values = run["all_images_per_s"]
    return f"{run['images_per_s']:.1f} ({min(values):.1f}-{max(values):.1f})"


def _ratio(r: dict[str, Any], part: str) -> float:
    return r[part]["compiled"]["images_per_s"] / r[part]["eager"]["images_per_s"]


COLUMNS = (
    Column("threads", "threads"),
    Column("train eager (range)", lambda r: _median_and_range(r["training"]["eager"])),
    Column("compiled (range)", lambda r: _median_and_range(r["training"]["compiled"])),
    Column("ratio", lambda r: _ratio(r, "training"), ".2f"),
    Column("DDIM eager", lambda r: r["sampling"]["eager"]["images_per_s"], ".2f"),
    Column("compiled", lambda r: r["sampling"]["compiled"]["images_per_s"], ".2f"),
    Column("ratio", lambda r: _ratio(r, "sampling"), ".2f"),
    Column("max |diff|", lambda r: r["sampling"]["compiled_vs_eager_max_abs_diff"], ".2e"),
)


def table(results: dict[str, Any]) -> str:
    """Text table of images/s (training: medians, with the range) and compiled/eager ratios."""
    return format_table([{**r, "threads": threads} for threads, r in results.items()], COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.base_config = load_config(args.config)  # read once: every measurement runs the same config
    images, _ = read_split_numpy(args.shards, "train")
    needed = (args.warmup_steps + args.steps) * args.batch
    data = torch.from_numpy(images[:needed])
    results = {}
    load_start = load_average_1m()
    for threads in args.threads:
        log(f"{threads} thread(s)")
        results[threads] = measure(args, data, threads)
    print(table(results))
    figures = {"config": str(args.config), "batch": args.batch, "warmup_steps": args.warmup_steps,
               "steps": args.steps, "rounds": args.rounds, "sample_batch": args.sample_batch,
               "ddim_steps": args.ddim_steps, "results": {str(k): v for k, v in results.items()}}
    report = build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures)
    print(f"wrote {write_report(args.output, report)}")


if __name__ == "__main__":
    main()
