"""Sample quality against cost: the FD of each sampler at a number of network evaluations per image.

For one trained model (``--model``: ``models:/...``, ``runs:/...``, ``s3://...`` or a checkpoint
folder; for example the model that ``configs/fashion_mnist.yaml`` trains), each
sampler of ``--samplers`` is run at each budget E of ``--evals`` network evaluations per image
(``SamplerSettings.network_evaluations`` checks the count):

* ``ancestral``: the ancestral DDPM step (Ho et al. 2020 Alg. 2) on E evenly spaced timesteps
  (``pc`` with 0 corrector steps; at E = T it is the full ``p_sample_loop``);
* ``ddim``: DDIM, eta = 0, E uniform timesteps (Song et al. 2021, eq. 12);
* ``dpm_solver``: DPM-Solver++(2M), E logSNR-uniform steps (Lu et al. 2022);
* ``dpm_solver_sde``: SDE-DPM-Solver++(2M), its stochastic form (``algorithm="sde-dpmsolver++"``),
  E logSNR-uniform steps;
* ``pc``: predictor-corrector (Song et al. 2021, SDEs, Alg. 2 for the VP SDE): E / 2 ancestral
  predictor steps, each followed by one Langevin corrector step with ``--snr``;
* ``langevin``: annealed Langevin dynamics (Song & Ermon 2019), E - 1 noise levels, one step each
  (+ one final denoising evaluation).

Every cell draws ``--images`` N samples in this process (``torch.set_num_threads(--threads)``) in
seeded blocks of ``--block`` (``evaluation.distributed_sampling.sample_blocks``, the same blocks for
every sampler), times them (wall seconds per image), and scores them with the FD classifier
(``--classifier``) against the statistics of the train split (cached, ``evaluation.fd``). The floor
is the FD of N real val images against the same reference. Prints a table, writes JSON (default
``benchmarks/results/bench_samplers.json``) and a PNG plot of FD against evaluations (log x).

    python benchmarks/bench_samplers.py --model models:/ddpm-fashion-mnist/1 \\
        --classifier models:/fd-classifier-fashion-mnist/1 --shards data/fashion-mnist-shards

The defaults (N = 2,000; E = 10, 20, 50, 100, 1000; all six samplers) are the full grid;
on a 2-core CPU a 1,000-evaluation cell of 2,000 images alone takes hours, so ``--images`` and
``--evals`` choose a smaller one (each cell says its N).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from cli import add_threads, bench_parser, require_at_least
from machine import machine_info
from matplotlib.figure import Figure
from report import build_report, load_average_1m, write_report
from table import Column, format_table
from timing import time_calls

from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.generate import SamplerSettings
from diffusion_core.samplers.registry import SNR, SPACING
from pipelines.evaluation.distributed_sampling import num_blocks, sample_blocks
from pipelines.evaluation.fd import (
    FeatureNet,
    FeatureStats,
    StatsCache,
    images_fd,
    reference_and_floor,
)
from pipelines.evaluation.features import build_feature_net
from pipelines.evaluation.job import compiled_network
from pipelines.registry.model_store import fetch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_samplers"
SAMPLERS = ("ancestral", "ddim", "dpm_solver", "dpm_solver_sde", "pc", "langevin")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--model", required=True, help="the DDPM: model URI or checkpoint folder")
    parser.add_argument("--classifier", required=True, help="the FD classifier: model URI or folder")
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"))
    parser.add_argument("--images", type=int, default=2000, help="N, samples per cell (and the floor's N)")
    parser.add_argument("--evals", type=int, nargs="+", default=[10, 20, 50, 100, 1000],
                        help="network evaluations per image")
    parser.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS))
    parser.add_argument("--snr", type=float, default=SNR.default, help="the corrector's signal-to-noise ratio (pc)")
    parser.add_argument("--spacing", choices=SPACING.choices, default=None,
                        help="timesteps of every sampler (default: each its own, as listed above)")
    parser.add_argument("--cells", nargs="*", default=None, metavar="SAMPLER:EVALS",
                        help="extra cells beyond the grid, e.g. ancestral:1000")
    parser.add_argument("--block", type=int, default=250, help="images per seeded block (one batch)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads(parser, 2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="sample through torch.compile (as evaluate.py; compiled and warmed up at the block "
                             "size before the first cell, so no cell's time holds compiling); --no-compile: eager")
    parser.add_argument("--cache", default=None, help="FD statistics cache folder (default outputs/fd_cache)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"images": 2, "block": 1, "threads": 1, "evals": 2})
    return args


def settings_for(sampler: str, evals: int, snr: float, spacing: str | None = None) -> SamplerSettings:
    """The ``SamplerSettings`` that spends ``evals`` network evaluations per image (on ``spacing``'s
    timesteps when given, else on the sampler's own).

    Raises:
        ValueError: when ``sampler`` cannot spend exactly ``evals`` (pc needs an even count).
    """
    settings = _own_settings(sampler, evals, snr)
    return settings if spacing is None else dataclasses.replace(settings, spacing=spacing)


def _own_settings(sampler: str, evals: int, snr: float) -> SamplerSettings:
    if sampler == "ancestral":
        return SamplerSettings("pc", evals, corrector_steps=0)
    if sampler == "ddim":
        return SamplerSettings("ddim", evals)
    if sampler == "dpm_solver":
        return SamplerSettings("dpm_solver", evals)
    if sampler == "dpm_solver_sde":
        return SamplerSettings("dpm_solver", evals, algorithm="sde-dpmsolver++")
    if sampler == "pc":
        if evals % 2:
            raise ValueError(f"pc with one corrector step needs an even number of evaluations, got {evals}")
        return SamplerSettings("pc", evals // 2, corrector_steps=1, snr=snr)
    if sampler == "langevin":
        return SamplerSettings("langevin", evals - 1, corrector_steps=1, snr=snr)
    raise ValueError(f"unknown sampler {sampler!r}; one of {SAMPLERS}")


def sampling_network(loaded: LoadedModel, args: argparse.Namespace) -> Callable[..., torch.Tensor]:
    """The eager UNet, or (``--compile``) its compiled version already called at every block size of
    the run, so that compiling (minutes on CPU) is timed in no cell."""
    if not args.compile:
        return loaded.model
    network = compiled_network(loaded.model, loaded.unet_config.image_shape, "cpu")
    sizes = {min(args.block, args.images - b * args.block) for b in range(num_blocks(args.images, args.block))}
    with torch.no_grad():
        for size in sorted(sizes):
            network(torch.zeros(size, *loaded.unet_config.image_shape), torch.zeros(size, dtype=torch.long))
    return network


def run_cell(loaded: LoadedModel, network: Callable[..., torch.Tensor], settings: SamplerSettings,
             args: argparse.Namespace, net: FeatureNet, reference: FeatureStats) -> dict[str, Any]:
    """N samples with ``settings`` drawn through ``network`` (``loaded.model`` or its compiled
    version): wall seconds per image and their FD to the reference."""
    blocks = np.arange(num_blocks(args.images, args.block))
    out: dict[str, Any] = {}
    seconds = time_calls(lambda _: out.update(sample_blocks(
        loaded.diffusion, network, loaded.unet_config.image_shape, settings, args.images, args.block, args.seed,
        blocks)), 1).total
    return {"fd": images_fd(net, out["image"], reference), "seconds": seconds, "seconds_per_image": seconds / args.images,
            "images": args.images, "settings": settings.params(),
            "evals": settings.network_evaluations(loaded.diffusion.num_timesteps)}


def grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(sampler, evals) cells: the product of ``--samplers`` and ``--evals`` plus ``--cells``."""
    cells = [(s, e) for e in sorted(args.evals) for s in args.samplers]
    for extra in args.cells or []:
        sampler, _, evals = extra.partition(":")
        cells.append((sampler, int(evals)))
    return cells


def plot(rows: list[dict[str, Any]], floor: float, images: int) -> bytes:
    """PNG: FD against evaluations per image, one line per sampler, the floor dashed."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        points = sorted((r["evals"], r["fd"]) for r in rows if r["sampler"] == sampler)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=sampler)
    ax.axhline(floor, linestyle="--", color="gray", label=f"floor (N={images} real val images)")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("FD (classifier features)")
    ax.set_title(f"FD of N={images} samples against the train split")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def table(rows: list[dict[str, Any]], floor: float) -> str:
    """Text table: sampler, evaluations, FD, FD / floor, seconds per image."""
    return format_table(rows, (
        Column("sampler", "sampler"), Column("evals", "evals"), Column("FD", "fd", ".3f"),
        Column("FD/floor", lambda r: r["fd"] / floor, ".2f"), Column("s/image", "seconds_per_image", ".4f"),
    ))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load_start = load_average_1m()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(fetch_checkpoint(args.model))
    net = build_feature_net("classifier", classifier=args.classifier)
    reference, floor = reference_and_floor(args.shards, args.images, net, StatsCache(args.cache))
    print(f"floor (N={args.images} real val images): {floor:.3f}", flush=True)
    network = sampling_network(loaded, args)
    rows: list[dict[str, Any]] = []
    output = Path(args.output)
    for sampler, evals in grid(args):
        settings = settings_for(sampler, evals, args.snr, args.spacing)
        row = {"sampler": sampler, **run_cell(loaded, network, settings, args, net, reference)}
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {sampler:>11} {row['evals']:>5} evals: FD {row['fd']:.3f} "
              f"({row['seconds_per_image']:.4f} s/image)", flush=True)
        figures = {"model": args.model, "classifier": args.classifier, "shards": str(Path(args.shards).resolve()),
                   "images": args.images, "threads": args.threads, "block": args.block,
                   "compiled": network is not loaded.model, "seed": args.seed, "snr": args.snr, "floor": floor,
                   "features": net.identity, "rows": rows}
        # after every cell: a long run keeps what it measured
        write_report(output, build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures))
    print(table(rows, floor))
    output.with_suffix(".png").write_bytes(plot(rows, floor, args.images))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
