"""Benchmark the core model on this machine: training, DDPM / DDIM sampling, exact vs estimated bound.

For the Fashion-MNIST UNet and diffusion of ``configs/fashion_mnist.yaml`` (28x28x1, T = 1000),
freshly initialised with a fixed seed (speed does not depend on the weights), on random inputs:

* training: one step = ``GaussianDiffusion.training_losses`` (forward) + backward + Adam, batch 64;
* DDPM: ``p_sample_loop`` (T = 1000 network calls per batch);
* DDIM: ``ddim_sample_loop`` with 50 steps;
* exact bound: ``calc_bpd_loop`` (T network calls per batch);
* estimated bound: ``calc_bpd_estimate`` with K = 32 network calls per batch.

Each step of a loop is timed through the loop's own ``progress`` callback; the reported seconds per
step are the median over the timed steps (the machine is shared, the median resists outliers).
Loops too long to run whole (DDPM, the exact bound, and everything in ``--quick``) are stopped
after ``--timed-steps`` steps by the callback, and their images/s are extrapolated linearly from
the median step time to all steps; the table and the JSON mark those rows ``extrapolated``.
The 1-minute load average before and after is recorded: on a loaded machine the numbers are lower
bounds of what it can do.

    python benchmarks/bench_core.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_core.py --quick    # smoke run (seconds)

Writes ``benchmarks/results/bench_core.json`` (``bench_core_quick.json`` with ``--quick``) and
prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml
from cli import add_threads, bench_parser, default_output, require_at_least
from machine import machine_info
from report import build_report, load_average_1m, write_report
from table import Column, print_table
from timing import ProgressTimer, Timing, time_calls

from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
SCRIPT = "bench_core"


@dataclass(frozen=True)
class Result:
    """One measured row: ``images_per_s = batch / (median_step_s * total_steps)``.

    ``total_steps`` is the number of network calls one batch needs (1 for a training step),
    ``timed_steps`` how many were timed; ``extrapolated`` when fewer than ``total_steps`` were.
    """

    name: str
    batch: int
    total_steps: int
    timed_steps: int
    median_step_s: float
    images_per_s: float
    extrapolated: bool
    wall_s: float


def time_loop(name: str, run: Callable[[ProgressTimer], object], batch: int, total: int, limit: int | None,
              sync: Callable[[], None]) -> Result:
    """Time ``run(progress)`` (a sampling or bound loop of ``total`` steps) step by step, stopping after
    ``limit`` steps when ``limit < total``."""
    limit = None if limit is None or limit >= total else limit
    start = time.perf_counter()
    timing = ProgressTimer(sync, limit=limit).run(run)
    return _result(name, batch, total, timing, limit is not None, time.perf_counter() - start)


def _result(name: str, batch: int, total: int, timing: Timing, extrapolated: bool, wall: float) -> Result:
    median = timing.median
    return Result(name, batch, total, len(timing.seconds), median, batch / (median * total), extrapolated, wall)


def time_training(model: UNet, diffusion: GaussianDiffusion, batch: int, steps: int, device: torch.device,
                  sync: Callable[[], None]) -> Result:
    """Median time of ``steps`` training steps (forward + backward + Adam) after one warm-up step."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    c, s = model.config.in_channels, model.config.image_size
    x_start = torch.rand(batch, c, s, s, device=device) * 2 - 1

    def step(_: int) -> None:
        t = torch.randint(diffusion.num_timesteps, (batch,), device=device)
        loss = diffusion.training_losses(model, x_start, t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    timing = time_calls(step, steps, warmup=1, sync=sync)
    model.eval()
    return _result("train (fwd+bwd+Adam)", batch, 1, timing, False, time.perf_counter() - start)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = bench_parser(SCRIPT, __doc__)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML with model and diffusion sections")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, a few timed steps each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    add_threads(p, 2, help="torch.set_num_threads (CPU)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (after 1 warm-up)")
    p.add_argument("--sample-batch", type=int, default=16, help="batch for sampling and bound evaluation")
    p.add_argument("--timed-steps", type=int, default=30,
                   help="steps timed of the DDPM loop and the exact bound before extrapolating")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--bound-samples", type=int, default=32, help="K of calc_bpd_estimate")
    args = p.parse_args(argv)
    if args.quick:
        args.train_batch, args.train_steps, args.sample_batch, args.timed_steps = 16, 2, 4, 3
        args.bound_samples = 4
        if args.output == default_output(SCRIPT):
            args.output = default_output(f"{SCRIPT}_quick")  # a smoke run keeps the full results
    require_at_least(p, args, {"threads": 1, "train_batch": 1, "train_steps": 1, "sample_batch": 1,
                               "timed_steps": 1, "ddim_steps": 1, "bound_samples": 2})
    return args


def run(args: argparse.Namespace) -> dict:
    """Build the model from ``args.config``, run every measurement and return the figures."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sections = yaml.safe_load(args.config.read_text())
    unet_config = UNetConfig.from_dict(sections["model"])
    diffusion = GaussianDiffusion(DiffusionConfig.from_dict(sections["diffusion"]))
    model = UNet(unet_config).to(device)
    n, c, s, T = args.sample_batch, unet_config.in_channels, unet_config.image_size, diffusion.num_timesteps
    shape = (n, c, s, s)
    x_start = (torch.randint(0, 256, shape, device=device).float() / 127.5 - 1.0)
    quick_limit = args.timed_steps if args.quick else None

    results = [time_training(model, diffusion, args.train_batch, args.train_steps, device, sync)]
    with torch.no_grad():
        results.append(time_loop(f"DDPM sampling ({T} steps)", lambda p: diffusion.p_sample_loop(
            model, shape, progress=p), n, T, args.timed_steps, sync))
        results.append(time_loop(f"DDIM sampling ({args.ddim_steps} steps)", lambda p: diffusion.ddim_sample_loop(
            model, shape, num_steps=args.ddim_steps, progress=p), n, args.ddim_steps, quick_limit, sync))
        results.append(time_loop(f"exact bound calc_bpd_loop ({T} calls)", lambda p: diffusion.calc_bpd_loop(
            model, x_start, progress=p), n, T, args.timed_steps, sync))
        estimate: dict = {}
        timing = time_calls(lambda _: estimate.update(
            diffusion.calc_bpd_estimate(model, x_start, num_samples=args.bound_samples)), 1, sync=sync)
        k, wall = estimate["num_samples"], timing.total
        results.append(Result(f"estimated bound calc_bpd_estimate (K={k})", n, k, k, wall / k, n / wall, False, wall))

    return {
        "config": str(args.config.resolve()),
        "unet": unet_config.to_dict(),
        "diffusion": diffusion.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "quick": args.quick,
        "results": [asdict(r) for r in results],
    }


COLUMNS = (
    Column("measurement", "name", align="<"), Column("batch", "batch"), Column("steps/batch", "total_steps"),
    Column("timed", "timed_steps"), Column("s/step", "median_step_s", ".4f"), Column("images/s", "images_per_s", ".3f"),
    Column("", lambda r: "(extrapolated)" if r["extrapolated"] else "", align="<"),
)


def show(report: dict) -> None:
    """Print the results as a table, after the model, the machine and its load."""
    figures, m = report["figures"], report["machine"]
    load = m["load_average_1m"]
    print(f"UNet {figures['parameters']:,} params, {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads, OMP_WAIT_POLICY={m['omp_wait_policy']}); "
          f"load avg (1 min) {load['start']:.1f} -> {load['end']:.1f}")
    print_table(figures["results"], COLUMNS)
    if load["start"] > m["cpu_count"]:
        print(f"note: the machine was loaded (1-min load {load['start']:.1f} on {m['cpu_count']} CPUs); "
              "numbers are lower bounds")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run, print the table, write the JSON and print its absolute path."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load_start = load_average_1m()
    figures = run(args)
    report = build_report(SCRIPT, argv, machine_info(torch.device(args.device)), load_start, figures)
    show(report)
    print(f"wrote {write_report(args.output, report)}")


if __name__ == "__main__":
    main()
