"""How close the stratified K-sample estimate of the bound is to the exact bound, on a trained model.

For one checkpoint (a folder, ``s3://`` prefix, ``models:/`` or ``runs:/`` URI) and the first
``--num-images`` held-out images of a shard folder (the ``val`` split), this computes:

* the exact bound per image, ``calc_bpd_loop`` (T network calls per image; prior + L_{T-1}..L_0,
  Ho et al. 2020 eq. 5), once;
* ``--repeats`` independent estimates per image for each K in ``--ks`` (``calc_bpd_estimate``: K
  network calls per image, with its standard error).

It reports per K, in bits/dim: the bias (mean over images and repeats of estimate - exact, with its
standard error), the RMS error of one estimate of one image, the mean of the reported standard
errors against the actual spread of repeated estimates (calibration: 1.0 means honest), the error of
the mean over all images (what training logs as ``val_bpd``) and images/s of each method. The exact
bound itself is random only through its noise draws; both sides are in float32 on CPU.

    python benchmarks/bench_bound.py --model path/to/checkpoint --shards data/fashion-mnist-shards

Prints a table and writes ``benchmarks/results/bench_bound.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from cli import add_threads, bench_parser, require_at_least
from machine import machine_info
from report import build_report, load_average_1m, write_report
from table import Column, print_table
from timing import time_calls

from diffusion_core.checkpoint import load_checkpoint
from pipelines.data.shards.reader import read_split_numpy
from pipelines.registry.model_store import fetch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_bound"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder, s3:// prefix, models:/ or runs:/ URI")
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"),
                        help="preprocessed shard folder; its val split is used")
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32], help="K values of the estimate")
    parser.add_argument("--repeats", type=int, default=8, help="independent estimates per image and K")
    parser.add_argument("--batch", type=int, default=32, help="images per network call")
    add_threads(parser, 2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"num_images": 1, "batch": 1, "threads": 1, "repeats": 2, "ks": 2})
    return args


def batched(fn: Any, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """``fn(chunk)`` over chunks of ``images``; the per-image float64 outputs concatenated."""
    outs = [fn(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {key: torch.cat([o[key].double() for o in outs]) for key in ("total_bpd", "stderr") if key in outs[0]}


def exact_bounds(diffusion: Any, net: Any, images: torch.Tensor, args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    """Exact total bits/dim per image [N] (float64) and the seconds it took."""
    generator = torch.Generator().manual_seed(args.seed)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        timing = time_calls(lambda _: out.update(
            batched(lambda x: diffusion.calc_bpd_loop(net, x, generator=generator), images, args.batch)), 1)
    return out["total_bpd"], timing.total


def estimate_row(diffusion: Any, net: Any, images: torch.Tensor, exact: torch.Tensor, k: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """``args.repeats`` estimates per image at this K, compared with ``exact``."""
    values, stderrs = [], []

    def one_repeat(repeat: int) -> None:
        generator = torch.Generator().manual_seed(args.seed + 1 + repeat)
        out = batched(lambda x: diffusion.calc_bpd_estimate(net, x, num_samples=k, generator=generator),
                      images, args.batch)
        values.append(out["total_bpd"])
        stderrs.append(out["stderr"])

    with torch.no_grad():
        seconds = time_calls(one_repeat, args.repeats).total
    v, s = torch.stack(values), torch.stack(stderrs)  # [R, N]
    diff = v - exact
    set_means = v.mean(dim=1)  # the mean over the images of each repeat: what val_bpd reports
    set_stderr = torch.sqrt((s**2).sum(dim=1)) / v.shape[1]
    return {
        "k": k,
        "bias_bpd": float(diff.mean()), "bias_stderr_bpd": float(diff.mean(dim=0).std() / math.sqrt(diff.shape[1])),
        "rms_error_one_image_bpd": float(diff.pow(2).mean().sqrt()),
        "mean_reported_stderr_bpd": float(s.pow(2).mean().sqrt()),
        "actual_sd_of_repeats_bpd": float(v.std(dim=0).pow(2).mean().sqrt()),
        "set_mean_abs_error_bpd": float((set_means - exact.mean()).abs().mean()),
        "set_mean_reported_stderr_bpd": float(set_stderr.mean()),
        "images_per_s": args.repeats * len(images) / seconds,
    }


def show(exact_mean: float, exact_ips: float, rows: list[dict[str, Any]], n: int) -> None:
    """The table: one row per K, after the exact bound."""
    print(f"exact bound (calc_bpd_loop) over {n} held-out images: {exact_mean:.4f} bits/dim, "
          f"{exact_ips:.3f} images/s")
    print_table(rows, (
        Column("K", "k"), Column("bias", lambda r: f"{r['bias_bpd']:+.4f}+-{r['bias_stderr_bpd']:.4f}"),
        Column("RMS err 1 image", "rms_error_one_image_bpd", ".4f"),
        Column("reported se", "mean_reported_stderr_bpd", ".4f"), Column("actual sd", "actual_sd_of_repeats_bpd", ".4f"),
        Column("|err| of mean", "set_mean_abs_error_bpd", ".4f"),
        Column("se of mean", "set_mean_reported_stderr_bpd", ".4f"), Column("images/s", "images_per_s", ".2f"),
        Column("speed-up", lambda r: f"{r['images_per_s'] / exact_ips:.0f}x"),
    ))


def main(argv: Sequence[str] | None = None) -> int:
    """Exact bound, then the estimates; print the table and write the JSON. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load_start = load_average_1m()
    torch.set_num_threads(args.threads)
    folder = fetch_checkpoint(args.model)
    loaded = load_checkpoint(folder)
    net, diffusion, metadata = loaded.model, loaded.diffusion, loaded.metadata
    pixels, _ = read_split_numpy(str(Path(args.shards).resolve()), "val", limit=args.num_images)
    images = torch.from_numpy(pixels)
    exact, exact_s = exact_bounds(diffusion, net, images, args)
    rows = [estimate_row(diffusion, net, images, exact, k, args) for k in args.ks]
    exact_ips = len(images) / exact_s
    show(float(exact.mean()), exact_ips, rows, len(images))
    figures = {
        "model": args.model, "model_metadata": metadata, "shards": str(Path(args.shards).resolve()),
        "num_images": len(images), "repeats": args.repeats, "num_timesteps": diffusion.num_timesteps,
        "exact": {"mean_bpd": float(exact.mean()), "per_image_bpd": exact.tolist(), "images_per_s": exact_ips},
        "estimates": rows,
    }
    report = build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures)
    print(f"wrote {write_report(args.output, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
