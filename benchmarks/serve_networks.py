"""``bench_serve.py --compare-networks``: the replica's sampling throughput with each ``NetworkMode``, in one run.

For the UNet and diffusion of ``--config`` (weights moved off their initialisation by N(0, 0.05^2)
noise, so that the network computes something), each mode is built exactly as a Serve replica builds
it (``deploy.model_runner.ModelRunner``, which calls ``diffusion_core.inference_network``; the
compiled modes compile there, timed as ``build_s``), single-threaded like a replica of 1 CPU. Then
``--rounds`` rounds, the modes interleaved within each round so that a drift in machine load hits
them alike, each run ``SCHEDULE``: the batches of one-image DDIM requests that ``@serve.batch``
hands a replica under load (``sample_many``, i.e. ``ddim_sample_loop`` with one generator per
request). Round 1 is reported apart (``first_round``): a mode that compiles a batch size lazily pays
for it there. Images/s is the median of the later rounds; ratios are to eager within this run, also
per round (the spread of those says whether the difference is larger than the machine's noise).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from machine import machine_info
from report import build_report, load_average_1m, write_report
from timing import time_calls

from deploy.model_runner import ModelRunner, SampleJob
from diffusion_core import DiffusionConfig, GaussianDiffusion, UNet, UNetConfig
from diffusion_core.checkpoint import LoadedModel
from pipelines.registry.model_identity import ModelIdentity

SCHEDULE = (8, 8, 3, 8, 1, 5, 8, 2, 8, 6)
"""Batch sizes (one-image requests per ``sample_many`` call) of one round: mostly full batches of
``max_batch_size`` 8, with the ragged ones that arrive between them."""
NOTE = ("absolute numbers depend on the machine's load (see machine.load_average_1m); compare only the ratios "
        "within one run (modes interleaved per round)")


def computing_model(config: Path) -> tuple[UNet, UNetConfig, DiffusionConfig]:
    """The ``model``/``diffusion`` sections of the YAML ``config``: a UNet (seed 0) whose every weight
    is moved by N(0, 0.05^2) noise (seed 3): a fresh UNet's zero output convolution outputs 0."""
    sections = yaml.safe_load(config.read_text())
    unet_config = UNetConfig.from_dict(sections["model"])
    diffusion_config = DiffusionConfig.from_dict(sections["diffusion"])
    torch.manual_seed(0)
    model = UNet(unet_config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model, unet_config, diffusion_config


def run_round(runner: ModelRunner, ddim_steps: int) -> float:
    """Seconds to run ``SCHEDULE`` through ``runner.sample_many`` (DDIM, one image per request)."""
    def one_batch(index: int) -> None:
        jobs = [SampleJob(1, "ddim", ddim_steps, 0.0, seed, True) for seed in range(SCHEDULE[index])]
        results = runner.sample_many(jobs)
        assert not any(isinstance(r, Exception) for r in results), results

    return time_calls(one_batch, len(SCHEDULE)).total


def max_abs_diff(runner: ModelRunner, reference: ModelRunner) -> float:
    """Largest |difference| of ``runner.network`` from the eager network on 5 seeded images."""
    x = torch.randn((5, *runner.image_shape), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 100, 500, 999]) % runner.num_timesteps
    with torch.no_grad():
        return float((runner.network(x, t) - reference.network(x, t)).abs().max())


def compare_networks(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Build every mode of ``args.compare_networks`` (eager first, the reference), run the rounds,
    write the JSON (``report.write_report``, the command ``bench_serve.py <argv>``) to ``args.output``
    after every step (a slow compile leaves what was measured); returns the figures."""
    load_start = load_average_1m()
    torch.set_num_threads(1)
    model, unet_config, diffusion_config = computing_model(args.config)
    loaded = LoadedModel(model, GaussianDiffusion(diffusion_config), unet_config, diffusion_config, {})
    modes = ["eager", *[m for m in args.compare_networks if m != "eager"]]
    machine = machine_info(torch.device("cpu"))

    def write(figures: dict[str, Any]) -> dict[str, Any]:
        write_report(args.output, build_report("bench_serve", argv, machine, load_start, figures))
        return figures

    result: dict[str, Any] = {
        "note": NOTE, "config": str(args.config), "ddim_steps": args.ddim_steps, "schedule": list(SCHEDULE),
        "rounds": args.rounds, "modes": {},
    }
    runners: dict[str, ModelRunner] = {}
    for mode in modes:
        print(f"building {mode}", flush=True)
        start = time.perf_counter()
        runners[mode] = ModelRunner(loaded, ModelIdentity(uri="bench"), network=mode)
        result["modes"][mode] = {"build_s": round(time.perf_counter() - start, 2), "runs": runners[mode].network_mode,
                                 "max_abs_diff_vs_eager": max_abs_diff(runners[mode], runners["eager"]), "round_s": []}
        write(result)
    images = sum(SCHEDULE)
    for round_index in range(args.rounds):
        for mode, runner in runners.items():
            seconds = run_round(runner, args.ddim_steps)
            result["modes"][mode]["round_s"].append(round(seconds, 3))
            print(f"round {round_index + 1} {mode:9s} {images / seconds:7.2f} images/s", flush=True)
        write(_summarize(result, images))
    return write(_summarize(result, images))


def _summarize(result: dict[str, Any], images: int) -> dict[str, Any]:
    """Per mode: first-round and median later-round images/s, the ratio to eager; the winner."""
    for entry in result["modes"].values():
        rounds = entry["round_s"]
        entry["first_round_images_per_s"] = round(images / rounds[0], 3)
        later = rounds[1:] or rounds
        entry["images_per_s"] = round(images / statistics.median(later), 3)
    eager = result["modes"]["eager"]
    for entry in result["modes"].values():
        entry["ratio_to_eager"] = round(entry["images_per_s"] / eager["images_per_s"], 3)
        entry["ratio_to_eager_per_round"] = [round(e / s, 3) for s, e in zip(entry["round_s"], eager["round_s"])]
    built = {mode: e for mode, e in result["modes"].items() if e["runs"] == mode}
    result["winner"] = max(built, key=lambda mode: built[mode]["images_per_s"])
    return result

