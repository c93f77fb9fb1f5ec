"""Classifier-free guidance: FD and sample class accuracy of a class-conditional model against the
guidance scale, next to an unconditional model trained the same way.

For the conditional model (``--cond-model``, trained with ``configs/fashion_mnist_cond.yaml``) and
the unconditional one (``--uncond-model``, ``configs/fashion_mnist.yaml``), N = ``--images``
class-balanced samples (sample i asks for class i mod K) are drawn with the sampler the docs
recommend for about 20 network evaluations (SDE-DPM-Solver++(2M), quadratic spacing,
``--steps`` steps) at each guidance scale s of ``--scales`` (s = 1: the conditional model, s = 0:
its unconditional half, Ho & Salimans 2022 in diffusers' convention). A guided step (s not 0 or 1)
evaluates the network twice per image (one call on the doubled batch), so each such scale is also
drawn at ``--steps / 2`` steps: the FD at equal network evaluations.

With ``--guidance-interval LO HI`` the guided scales are drawn guiding only the steps whose noise
level sigma_t = sqrt(1 / abar_t - 1) lies in (LO, HI] (Kynkaanniemi et al. 2024; the other steps
use the conditional model, one evaluation each). Their evaluations per image are counted on a
one-image run of the same sampler, and their equal-evaluation rows take the most steps whose count
stays within ``--steps``.

Every row: network evaluations per image, FD (classifier features) against the train split, FD /
floor (the floor is the FD of N real val images against the same reference), the share of samples
the FD classifier assigns to the class asked for (overall and per class), and wall seconds per
image. The classifier's accuracy on those N real val images is recorded beside them
(``real_val_accuracy``): a sample's class accuracy is read against it, since the classifier also
errs on real images. Prints a table, writes JSON (default ``benchmarks/results/bench_guidance.json``) after
every row and a PNG plot of FD and class accuracy against the scale at the end. Rows already in the JSON
(same models, classifier, shards, N, block and seed) are kept and not drawn again, so a long run can be
continued with the same ``--output``::

    python benchmarks/bench_guidance.py --cond-model models:/ddpm-fashion-mnist-cond/1 \\
        --uncond-model models:/ddpm-fashion-mnist/1 --classifier models:/fd-classifier-fashion-mnist/1 \\
        --shards data/fashion-mnist-shards
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from cli import add_threads, bench_parser, require_at_least
from machine import machine_info
from matplotlib.figure import Figure
from report import build_report, load_average_1m, read_figures, write_report
from scoring import classifier_reference, draw_samples, recommended_settings
from table import Column, format_table
from timing import time_calls

from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.generate import guided_network_evaluations
from diffusion_core.guidance import check_guidance_interval, guidance_evaluations
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluation.conditioning import class_accuracy, predicted_classes
from pipelines.evaluation.fd import images_fd
from pipelines.registry.model_store import fetch_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_guidance"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    parser.add_argument("--cond-model", required=True, help="the class-conditional DDPM: model URI or folder")
    parser.add_argument("--uncond-model", required=True, help="the unconditional DDPM: model URI or folder")
    parser.add_argument("--classifier", required=True, help="the FD classifier: model URI or folder")
    parser.add_argument("--shards", default=str(ROOT / "data" / "fashion-mnist-shards"))
    parser.add_argument("--images", type=int, default=2000, help="N, samples per row (and the floor's N)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 1.5, 2.0, 3.0, 5.0])
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (SDE-DPM-Solver++(2M), quadratic)")
    parser.add_argument("--equal-evals", action=argparse.BooleanOptionalAction, default=True,
                        help="also draw each guided scale at --steps / 2 steps (the same evaluations as s = 1)")
    parser.add_argument("--only-equal-evals", action="store_true",
                        help="draw guided scales only at --steps / 2 steps (the rows that compare at equal evaluations)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="guide only at noise levels LO < sigma_t <= HI (e.g. 0.28 5.42; HI may be inf)")
    parser.add_argument("--block", type=int, default=250, help="images per seeded block (one batch)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads(parser, 2)
    parser.add_argument("--cache", default=None, help="FD statistics cache folder (default outputs/fd_cache)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, {"images": 2, "block": 1, "threads": 1, "steps": 2})
    if any(not np.isfinite(s) or s < 0 for s in args.scales):
        parser.error(f"--scales must be finite and >= 0, got {args.scales}")
    if args.guidance_interval is not None:
        try:
            check_guidance_interval(tuple(args.guidance_interval))
        except ValueError as err:
            parser.error(f"--guidance-interval: {err}")
    return args


def plan(args: argparse.Namespace, fitting_steps: Callable[[float], int] | None = None) -> list[dict[str, Any]]:
    """The rows to draw: the unconditional model, then each scale at ``--steps`` and (guided scales,
    ``--equal-evals``) at ``--steps // 2``; with ``--only-equal-evals`` guided scales only at the
    equal-evaluation steps. With ``--guidance-interval`` the guided rows carry it (``"interval"``)
    and their equal-evaluation steps are ``fitting_steps(scale)`` (required then)."""
    interval = None if args.guidance_interval is None else list(args.guidance_interval)

    def guided(scale: float) -> bool:
        return guidance_evaluations(scale) == 2

    def conditional(scale: float, steps: int) -> dict[str, Any]:
        extra = {"interval": interval} if interval is not None and guided(scale) else {}
        return {"model": "conditional", "scale": scale, "steps": steps, **extra}

    rows: list[dict[str, Any]] = [{"model": "unconditional", "scale": None, "steps": args.steps}]
    rows += [conditional(s, args.steps) for s in args.scales if not (args.only_equal_evals and guided(s))]
    if args.equal_evals or args.only_equal_evals:
        rows += [conditional(s, args.steps // 2 if interval is None else fitting_steps(s))
                 for s in args.scales if guided(s)]
    return rows


def row_key(row: dict[str, Any]) -> tuple[str, float | None, int, tuple[float, ...] | None]:
    """A row's identity: ``(model, scale, steps, guidance interval or None)``."""
    interval = row.get("interval")
    return row["model"], row["scale"], row["steps"], None if interval is None else tuple(interval)


def evaluations_per_image(loaded: LoadedModel, steps: int, scale: float, interval: Sequence[float] | None) -> int:
    """Network evaluations per image of one conditional row (``guided_network_evaluations``: a doubled
    batch counts 2, and with ``interval`` only the calls at guided timesteps are doubled)."""
    return guided_network_evaluations(loaded.diffusion, recommended_settings(steps), scale,
                                      None if interval is None else tuple(interval))


def steps_within(loaded: LoadedModel, budget: int, scale: float, interval: Sequence[float]) -> int:
    """The most sampler steps (>= 2) whose counted evaluations per image with ``interval`` are at most
    ``budget`` (2 if none fits)."""
    for steps in range(budget, 2, -1):
        if evaluations_per_image(loaded, steps, scale, interval) <= budget:
            return steps
    return 2


def rows_done(output: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``output`` (``[]`` if there is no such file), measured with the same ``settings`` (what a
    row depends on besides its own model, scale and steps: models, classifier, shards, N, block, seed).

    Raises:
        SystemExit: ``output`` holds rows measured with other settings (naming the first that differs).
    """
    if not output.is_file():
        return []
    figures = read_figures(output)
    for key, value in settings.items():
        if figures.get(key) != value:
            raise SystemExit(f"error: {output} holds rows with {key}={figures.get(key)!r}, not {value!r}; "
                             "give another --output")
    return list(figures["rows"])


def draw(loaded: LoadedModel, row: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, np.ndarray], float]:
    """N samples of one row (class-balanced for the conditional model) and their wall seconds."""
    settings = recommended_settings(row["steps"])
    classes = None if row["scale"] is None else range(loaded.unet_config.num_classes)
    out: dict[str, np.ndarray] = {}
    seconds = time_calls(lambda _: out.update(draw_samples(
        loaded, settings, args.images, args.block, args.seed, classes=classes,
        guidance_scale=1.0 if row["scale"] is None else row["scale"],
        guidance_interval=None if row.get("interval") is None else tuple(row["interval"]))), 1).total
    return out, seconds


def score(row: dict[str, Any], samples: dict[str, np.ndarray], seconds: float, loaded: LoadedModel, net: Any,
          reference: Any, num_classes: int) -> dict[str, Any]:
    """The row's figures: evaluations, FD, class accuracy (every row is asked for class i mod K;
    the unconditional model's accuracy is the chance that a sample falls in the class its index
    names, about 1/K), seconds per image."""
    if row["scale"] is None:
        evals = recommended_settings(row["steps"]).network_evaluations(loaded.diffusion.num_timesteps)
    else:
        evals = evaluations_per_image(loaded, row["steps"], row["scale"], row.get("interval"))
    asked = np.arange(len(samples["image"])) % num_classes
    accuracy = class_accuracy(predicted_classes(net.model, samples["image"]), asked, range(num_classes))
    return {**row, "evals": evals, "fd": images_fd(net, samples["image"], reference), "seconds": seconds,
            "seconds_per_image": seconds / len(samples["image"]), "images": len(samples["image"]), **accuracy}


def real_val_accuracy(shards: str, images: int, net: Any) -> float:
    """The FD classifier's accuracy on the first ``images`` real val images (the floor's images)."""
    real, labels = read_split_numpy(shards, "val", limit=images)
    return float((predicted_classes(net.model, real) == labels).mean())


def interval_text(row: dict[str, Any]) -> str:
    """A row's guidance interval as ``(LO, HI]``, or ``-`` for a row guided at every step (or not guided)."""
    interval = row.get("interval")
    return "-" if interval is None else "({:g}, {:g}]".format(*interval)


def plot(rows: list[dict[str, Any]], floor: float, images: int, steps: int,
         real_accuracy: float | None = None) -> bytes:
    """PNG: FD (left) and sample class accuracy (right) against the guidance scale, at ``steps``
    steps and at equal evaluations (one line each, and one per guidance interval); the unconditional
    model's FD and the floor as lines."""
    fig = Figure(figsize=(10.5, 4.0))
    fd_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["scale"] is not None:
            label = f"{steps} steps" if r["steps"] == steps else "equal evaluations"
            if r.get("interval") is not None:
                label += f", guided in {interval_text(r)}"
            groups.setdefault(label, []).append(r)
    for label, chosen in groups.items():
        points = sorted((r["scale"], r["fd"], r["sample_class_accuracy"]) for r in chosen)
        fd_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"conditional, {label}")
        acc_ax.plot([p[0] for p in points], [100 * p[2] for p in points], marker="o", label=f"conditional, {label}")
    for r in rows:
        if r["scale"] is None:
            fd_ax.axhline(r["fd"], color="tab:red", linestyle=":", label=f"unconditional ({r['evals']} evals)")
    fd_ax.axhline(floor, linestyle="--", color="gray", label=f"floor (N={images} real val images)")
    acc_ax.axhline(95, linestyle="--", color="gray", label="95%")
    if real_accuracy is not None:
        acc_ax.axhline(100 * real_accuracy, linestyle=":", color="black", label="real val images")
    fd_ax.set(xlabel="guidance scale s", ylabel="FD (classifier features)", yscale="log",
              title=f"FD of N={images} class-balanced samples")
    acc_ax.set(xlabel="guidance scale s", ylabel="samples classified as asked (%)", title="class accuracy")
    for ax in (fd_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def table(rows: list[dict[str, Any]], floor: float) -> str:
    """Text table: model, scale, guidance interval, steps, evaluations, FD, FD / floor, class accuracy, s/image."""
    return format_table(rows, (
        Column("model", "model"), Column("scale", lambda r: "-" if r["scale"] is None else r["scale"]),
        Column("interval", interval_text),
        Column("steps", "steps"), Column("evals", "evals"), Column("FD", "fd", ".3f"),
        Column("FD/floor", lambda r: r["fd"] / floor, ".2f"),
        Column("class acc %", lambda r: 100 * r["sample_class_accuracy"], ".1f"),
        Column("s/image", "seconds_per_image", ".4f"),
    ))


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    load_start = load_average_1m()
    output = Path(args.output)
    settings = {"cond_model": args.cond_model, "uncond_model": args.uncond_model, "classifier": args.classifier,
                "shards": str(Path(args.shards).resolve()), "images": args.images, "block": args.block, "seed": args.seed}
    rows = rows_done(output, settings)
    done = {row_key(row) for row in rows}
    torch.set_num_threads(args.threads)
    models = {"conditional": load_checkpoint(fetch_checkpoint(args.cond_model)),
              "unconditional": load_checkpoint(fetch_checkpoint(args.uncond_model))}
    num_classes = models["conditional"].unet_config.num_classes
    if num_classes is None or models["unconditional"].unet_config.num_classes is not None:
        raise SystemExit("error: --cond-model must be class-conditional and --uncond-model unconditional")
    fd_reference = classifier_reference(args.shards, args.images, args.classifier, args.cache)
    net, reference, floor = fd_reference.net, fd_reference.reference, fd_reference.floor
    real_accuracy = real_val_accuracy(args.shards, args.images, net)
    print(f"floor (N={args.images} real val images): {floor:.3f}; the classifier's accuracy on them: "
          f"{100 * real_accuracy:.1f}%", flush=True)
    fitting = partial(steps_within, models["conditional"], args.steps, interval=args.guidance_interval)
    for row in plan(args, fitting):
        if row_key(row) in done:
            continue
        loaded = models[row["model"]]
        samples, seconds = draw(loaded, row, args)
        rows.append(score(row, samples, seconds, loaded, net, reference, num_classes))
        last = rows[-1]
        print(f"[{time.strftime('%H:%M:%S')}] {row['model']:>13} s={row['scale']} {last['evals']:>3} evals: "
              f"FD {last['fd']:.3f}  class accuracy {100 * last['sample_class_accuracy']:.1f}%", flush=True)
        figures = {**settings, "threads": args.threads, "sampler": recommended_settings(args.steps).params(),
                   "floor": floor, "real_val_accuracy": real_accuracy, "features": net.identity, "num_classes": num_classes, "rows": rows}
        # after every row: a long run keeps what it measured
        write_report(output, build_report(SCRIPT, argv, machine_info(torch.device("cpu")), load_start, figures))
    print(table(rows, floor))
    output.with_suffix(".png").write_bytes(plot(rows, floor, args.images, args.steps, real_accuracy))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
