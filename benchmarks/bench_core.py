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
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from machine import machine_info

from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "bench_core.json"


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


class _Stop(Exception):
    """Raised by ``StepTimer`` to end a loop once enough steps are timed."""


class StepTimer:
    """``progress(step_index, total_steps)`` callback recording the time of every step.

    Raises ``_Stop`` after ``limit`` steps (None: never), which ends the loop being timed.
    """

    def __init__(self, sync: Callable[[], None], limit: int | None):
        self.sync, self.limit = sync, limit
        self.times: list[float] = []
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        self.sync()
        self.times.append(time.perf_counter())
        if self.limit is not None and len(self.times) >= self.limit:
            raise _Stop

    def step_seconds(self) -> list[float]:
        """Durations of the recorded steps, in seconds."""
        edges = [self.start, *self.times]
        return [b - a for a, b in zip(edges, edges[1:])]


def time_loop(name: str, run: Callable[[StepTimer], object], batch: int, total: int, limit: int | None,
              sync: Callable[[], None]) -> Result:
    """Time ``run(progress)`` (a sampling or bound loop of ``total`` steps), stopping after ``limit``
    steps when ``limit < total``."""
    limit = None if limit is None or limit >= total else limit
    sync()
    timer = StepTimer(sync, limit)
    try:
        run(timer)
    except _Stop:
        pass
    wall = time.perf_counter() - timer.start
    steps = timer.step_seconds()
    median = statistics.median(steps)
    return Result(name, batch, total, len(steps), median, batch / (median * total), limit is not None, wall)


def time_training(model: UNet, diffusion: GaussianDiffusion, batch: int, steps: int, device: torch.device,
                  sync: Callable[[], None]) -> Result:
    """Median time of ``steps`` training steps (forward + backward + Adam) after one warm-up step."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    c, s = model.config.in_channels, model.config.image_size
    x_start = torch.rand(batch, c, s, s, device=device) * 2 - 1
    times, start = [], time.perf_counter()
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        t = torch.randint(diffusion.num_timesteps, (batch,), device=device)
        loss = diffusion.training_losses(model, x_start, t)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    model.eval()
    median = statistics.median(times)
    return Result("train (fwd+bwd+Adam)", batch, 1, steps, median, batch / median, False, time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML with model and diffusion sections")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches, a few timed steps each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (after 1 warm-up)")
    p.add_argument("--sample-batch", type=int, default=16, help="batch for sampling and bound evaluation")
    p.add_argument("--timed-steps", type=int, default=30,
                   help="steps timed of the DDPM loop and the exact bound before extrapolating")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--bound-samples", type=int, default=32, help="K of calc_bpd_estimate")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = p.parse_args(argv)
    if args.quick:
        args.train_batch, args.train_steps, args.sample_batch, args.timed_steps = 16, 2, 4, 3
        args.bound_samples = 4
    for name in ("threads", "train_batch", "train_steps", "sample_batch", "timed_steps", "ddim_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.bound_samples < 2:
        p.error(f"--bound-samples={args.bound_samples} must be >= 2")
    return args


def run(args: argparse.Namespace) -> dict:
    """Build the model from ``args.config``, run every measurement and return the report dict."""
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
    load_before = os.getloadavg()

    results = [time_training(model, diffusion, args.train_batch, args.train_steps, device, sync)]
    with torch.no_grad():
        results.append(time_loop(f"DDPM sampling ({T} steps)", lambda p: diffusion.p_sample_loop(
            model, shape, progress=p), n, T, args.timed_steps, sync))
        results.append(time_loop(f"DDIM sampling ({args.ddim_steps} steps)", lambda p: diffusion.ddim_sample_loop(
            model, shape, num_steps=args.ddim_steps, progress=p), n, args.ddim_steps, quick_limit, sync))
        results.append(time_loop(f"exact bound calc_bpd_loop ({T} calls)", lambda p: diffusion.calc_bpd_loop(
            model, x_start, progress=p), n, T, args.timed_steps, sync))
        start = time.perf_counter()
        estimate = diffusion.calc_bpd_estimate(model, x_start, num_samples=args.bound_samples)
        sync()
        wall = time.perf_counter() - start
        k = estimate["num_samples"]
        results.append(Result(f"estimated bound calc_bpd_estimate (K={k})", n, k, k, wall / k, n / wall, False, wall))

    return {
        "config": str(args.config.resolve()),
        "unet": unet_config.to_dict(),
        "diffusion": diffusion.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "quick": args.quick,
        "machine": machine_info(device),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "results": [asdict(r) for r in results],
    }


def print_table(report: dict) -> None:
    """Print the results as a fixed-width table, with the machine and load."""
    m, load = report["machine"], report["load_average_1min"]
    print(f"UNet {report['parameters']:,} params, {m['device']}, {m['cpu_count']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads, OMP_WAIT_POLICY={m['omp_wait_policy']}); "
          f"load avg (1 min) {load['before']:.1f} -> {load['after']:.1f}")
    header = f"{'measurement':<44} {'batch':>5} {'steps/batch':>11} {'timed':>6} {'s/step':>8} {'images/s':>10}"
    print(header + "\n" + "-" * len(header))
    for r in report["results"]:
        note = "  (extrapolated)" if r["extrapolated"] else ""
        print(f"{r['name']:<44} {r['batch']:>5} {r['total_steps']:>11} {r['timed_steps']:>6} "
              f"{r['median_step_s']:>8.4f} {r['images_per_s']:>10.3f}{note}")
    if load["before"] > m["cpu_count"]:
        print(f"note: the machine was loaded (1-min load {load['before']:.1f} on {m['cpu_count']} CPUs); "
              "numbers are lower bounds")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run, print the table, write the JSON and print its absolute path."""
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    output = args.output
    if args.quick and output == DEFAULT_OUTPUT:
        output = output.with_name("bench_core_quick.json")  # a smoke run keeps the full results
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
