"""Evaluate a trained DDPM on held-out data: bits/dim (exact, with its per-timestep breakdown, or
estimated) and a sample grid, logged to MLflow as an evaluation of that model.

    python pipelines/evaluate.py --model models:/ddpm-tiny/1 --shards data/fashion-mnist-shards --images 64
    python pipelines/evaluate.py --model runs/<run>/checkpoint_00000200 --shards ... --estimate 16
    python pipelines/evaluate.py --model ... --shards ... --sampler dpm_solver --sample-steps 20 --order 2
    python pipelines/evaluate.py --model ... --shards ... --fd 1000 --fd-features classifier \
        --fd-classifier models:/fd-classifier-fashion-mnist/1 --sampler ddim --sample-steps 50
    python pipelines/evaluate.py --model models:/ddpm-tiny/1 --shards ... --split test
    python pipelines/evaluate.py --model ... --shards ... --split test --images all --estimate 8 \
        --exact-images 256 --workers 2

``--split`` picks the scored split: ``val`` (default; the split training reports on) or ``test``
(the source's own test split, e.g. Fashion-MNIST's t10k files; an error when the shards have none).
``--images all`` scores every image of it. ``--estimate K`` estimates the bound from K stratified
timesteps per image (with its standard error), ``--exact-images M`` adds the exact bound on the
first M, and ``--workers W`` spreads either over W Ray actors that hold the model
(``evaluation.split_bound``; GPUs when the cluster has them). The bound is logged in bits/dim with
its split into L_T (prior), the sum of L_t for t >= 1 and L_0 (decoder), and the per-timestep plot.

``--model`` takes anything ``pipelines.registry.model_store.fetch_checkpoint`` does (``models:/name/version``,
``models:/name@alias``, ``runs:/<id>/model``, ``s3://...``, a local checkpoint folder). The results
go to a new MLflow run tagged with the model URI, registered name/version and the run that trained
the model; the metrics are also linked to the logged model (MLflow 3 ``model_id``) and the
validation data (an MLflow dataset input), so they show on the model's page. The sample grid's
sampler (``--sampler`` and its parameters, ``diffusion_core.generate.SamplerSettings``) is logged
as ``sample_*`` params.

``--fd N`` also draws N samples with that sampler, spread over the Ray cluster
(``evaluation.distributed_sampling``), and logs the Fréchet distance of their features to the
reference split's (``fd``, statistics cached on disk) and the floor (``fd_floor``: N real held-out
images against the same reference); ``--fd-features`` is ``classifier`` (``--fd-classifier``, made by
``pipelines/train_classifier.py``) or ``inception`` (``--inception-weights``, a local file).

A class-conditional model (trained with ``model.num_classes``) is scored with and without labels:
``eval_bpd*`` with no label (the bound on -log p(x)) and ``eval_*_cond`` with the split's true
labels (-log p(x | y)). ``--class-label LABEL ...`` (indices or the manifest's class names; ``all``,
the default, is every class) picks the classes of the grid (one row each) and of the FD's
class-balanced samples, drawn with classifier-free guidance at ``--guidance-scale S`` (1: the
conditional model; 0: the unconditional one; other values cost two network evaluations per step).
``--guidance-interval LO HI`` (with such a scale) guides only the steps whose noise level sigma_t =
sqrt(1 / abar_t - 1) lies in (LO, HI] (HI may be ``inf``) and uses the conditional model, one
evaluation, at the others (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models"); it is logged as the
``guidance_interval`` param ("LO,HI", or "none"), with the counted ``sample_guided_network_evaluations``.
With ``--fd-features classifier`` the classifier's predictions of those samples give the class
accuracy, per class and overall (``sample_class_accuracy*``):

    python pipelines/evaluate.py --model models:/ddpm-fashion-mnist-cond/1 --shards ... --split test \
        --class-label Sandal Sneaker --guidance-scale 2 --fd 1000 --fd-classifier models:/fd-classifier-fashion-mnist/1
    python pipelines/evaluate.py --model models:/ddpm-fashion-mnist-cond/1 --shards ... \
        --guidance-scale 3 --guidance-interval 0.28 5.42 --fd 1000 --fd-classifier models:/fd-classifier-fashion-mnist/1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from diffusion_core.generate import SamplerSettings
from diffusion_core.guidance import check_guidance_interval, guidance_evaluations
from diffusion_core.samplers.registry import (
    ALGORITHM,
    CORRECTOR_STEPS,
    DEFAULT_SAMPLER,
    NUM_STEPS,
    ORDER,
    SAMPLERS,
    SNR,
    SPACING,
    takers,
)
from pipelines.evaluation.fd_eval import FDSettings
from pipelines.evaluation.job import DEFAULT_EXPERIMENT, EvalSettings, evaluate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line (see the module docstring); ``--help`` lists every option."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/name/version, models:/name@alias, runs:/id/model, "
                                                        "s3://... or a local checkpoint folder")
    parser.add_argument("--shards", required=True,
                        help="preprocessed shard folder (local or s3://); --split says which split is scored")
    parser.add_argument("--split", choices=["val", "test"], default="val",
                        help="split to score: val (default) or the source's own test split")
    parser.add_argument("--images", type=image_count, default=64, metavar="N|all",
                        help="images to evaluate: the first N of the split, or all of it")
    parser.add_argument("--estimate", type=int, default=0, metavar="K",
                        help="estimate the bound with K timesteps per image instead of computing it exactly")
    parser.add_argument("--exact-images", type=int, default=0, metavar="M",
                        help="with --estimate: also the exact bound (all T terms) on the first M images")
    parser.add_argument("--workers", type=int, default=0,
                        help="spread the bound over W Ray actors (Ray Data; 1 CPU or GPU each; "
                             "the cluster of $RAY_ADDRESS, else a local one); 0: in this process")
    parser.add_argument("--samples", type=int, default=16, help="images in the sample grid (0: none)")
    add_sampler_arguments(parser)
    parser.add_argument("--class-label", nargs="+", default=None, metavar="LABEL",
                        help="class-conditional models: the classes to sample (label indices or class names of "
                             "the shards' manifest), or 'all' (default); an error for an unconditional model")
    parser.add_argument("--guidance-scale", type=float, default=1.0, metavar="S",
                        help="class-conditional models: classifier-free guidance scale s >= 0 of the samples "
                             "(1: conditional, 0: unconditional, > 1 guides; s not in {0, 1} costs 2 network "
                             "evaluations per step)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="class-conditional models, with --guidance-scale S not in {0, 1}: guide only the steps "
                             "with noise level LO < sigma_t <= HI, sigma_t = sqrt(1/abar_t - 1) (HI may be inf; "
                             "Kynkaanniemi et al. 2024); the other steps use the conditional model (1 network "
                             "evaluation); default: guide every step")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bound's noise and the samples")
    parser.add_argument("--experiment", default=None,
                        help=f"MLflow experiment (default: the training run's, else {DEFAULT_EXPERIMENT!r})")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="run the UNet through torch.compile (inductor; default on: 1.05-1.69x faster "
                             "sampling on CPU, benchmarks/bench_compile.py); the first call compiles, and a "
                             "failed compile falls back to eager with a warning; --no-compile: eager")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default: torch's choice; 1 is fastest on a busy machine)")
    fd = parser.add_argument_group("Fréchet distance (--fd N)")
    fd.add_argument("--fd", type=int, default=0, metavar="N", help="FD of N samples (0: none; else >= 2)")
    fd.add_argument("--fd-features", choices=("classifier", "inception"), default="classifier",
                    help="feature network: the project's classifier, or Inception-v3 pool3 (2048-D)")
    fd.add_argument("--fd-classifier", default=None, metavar="URI_OR_FOLDER",
                    help="the classifier of pipelines/train_classifier.py (models:/..., runs:/..., a folder)")
    fd.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local inception-2015-12-05.pt (TorchScript) for --fd-features inception; never downloaded")
    fd.add_argument("--fd-reference-split", choices=("train", "val"), default="train", help="reference split")
    fd.add_argument("--fd-reference-images", type=int, default=None,
                    help="first R images of the reference split (default: all)")
    fd.add_argument("--fd-floor-split", choices=("train", "val"), default="val",
                    help="split of the floor's N real images (the reference split: its last N, kept out of the reference)")
    fd.add_argument("--fd-cache", default=None, help="folder of cached reference statistics (default: outputs/fd_cache)")
    fd.add_argument("--fd-workers", type=int, default=2, help="Ray actors drawing the samples")
    fd.add_argument("--fd-block", type=int, default=16, help="images per seeded block (changes the images)")
    args = parser.parse_args(argv)
    if args.fd < 0:
        parser.error(f"--fd={args.fd} must be >= 0")
    if not args.fd and (args.fd_classifier or args.inception_weights):
        parser.error("--fd-classifier / --inception-weights need --fd N")
    try:
        fd_settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.exact_images and not args.estimate:
        parser.error("--exact-images M needs --estimate K (without it the exact bound covers all --images)")
    if args.exact_images and args.images is not None and args.exact_images > args.images:
        parser.error(f"--exact-images={args.exact_images} is more than --images={args.images}")
    minimums = {"exact_images": 0, "workers": 0, "estimate": 0, "samples": 0, "sample_steps": 1, "batch_size": 1,
                "seed": 0, "threads": 1}
    for name, low in minimums.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        parser.error(f"--guidance-scale={args.guidance_scale} must be a finite number >= 0")
    check_guidance_interval_flag(parser, args)
    try:
        sampler_settings_from_args(args)
    except ValueError as err:  # names the field: corrector_steps, snr, order
        parser.error(f"sampler settings: {err}")
    return args


def check_guidance_interval_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``, exit code 2, naming ``--guidance-interval``) an interval that is not
    0 <= LO < HI (``diffusion_core.guidance.check_guidance_interval``; HI may be ``inf``, LO must be
    finite, neither NaN), or one given with a ``--guidance-scale`` of 0 or 1, which does not guide."""
    if args.guidance_interval is None:
        return
    low, high = args.guidance_interval
    try:
        check_guidance_interval((low, high))
    except ValueError:
        parser.error(f"--guidance-interval {low:g} {high:g}: must be LO HI with 0 <= LO < HI (HI may be inf)")
    if guidance_evaluations(args.guidance_scale) == 1:
        parser.error(f"--guidance-interval {low:g} {high:g} needs --guidance-scale S other than 0 and 1 "
                     f"(got {args.guidance_scale:g}, which does not guide)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The grid's sampler flags, from the sampler registry (``diffusion_core.samplers.registry``):
    ``--sampler`` and one flag per parameter but DDIM's eta (which stays 0), with the registry's
    choices and defaults; ``--sample-steps`` is ``num_steps``."""
    spacings = ", ".join(f"{spec.default_spacing} for {spec.name}" for spec in SAMPLERS.values()
                         if "spacing" in spec.parameters)
    parser.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER,
                        help="sampler of the sample grid (ddpm always runs all T steps)")
    parser.add_argument("--sample-steps", type=int, default=NUM_STEPS.default,
                        help=f"{NUM_STEPS.help}; ignored by ddpm")
    parser.add_argument("--spacing", choices=SPACING.choices, default=None,
                        help=f"{SPACING.help} (default: {spacings})")
    parser.add_argument("--corrector-steps", type=int, default=CORRECTOR_STEPS.default,
                        help=f"{CORRECTOR_STEPS.help} (" + ", ".join(
                            f"{spec.name}: >= {spec.min_corrector_steps}" for spec in SAMPLERS.values()
                            if "corrector_steps" in spec.parameters) + ")")
    parser.add_argument("--snr", type=float, default=SNR.default, help=f"{SNR.help} ({', '.join(takers('snr'))}), > 0")
    parser.add_argument("--order", type=int, default=ORDER.default, help=ORDER.help)
    parser.add_argument("--algorithm", choices=ALGORITHM.choices, default=ALGORITHM.default, help=ALGORITHM.help)


def image_count(text: str) -> int | None:
    """``--images``: a count >= 1, or ``all`` (``None``: every image of the split).

    Raises:
        argparse.ArgumentTypeError: on anything else.
    """
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count >= 1 nor 'all'")
    return count


#: (label, total, s.e. from the timesteps, s.e. over images, L_T, sum of L_t for t >= 1, L_0): metric names.
BOUND_METRICS = (
    ("estimated", "eval_bpd_estimate", "eval_bpd_estimate_stderr", "eval_bpd_estimate_stderr_images",
     "eval_bpd_estimate_prior", "eval_bpd_estimate_terms", "eval_bpd_estimate_decoder"),
    ("exact", "eval_bpd", None, "eval_bpd_stderr_images", "eval_prior_bpd", "eval_terms_bpd", "eval_decoder_bpd"),
)


def describe_bound(metrics: dict[str, float], suffix: str = "", given: str = "") -> list[str]:
    """Human lines for the bound's metrics (bits/dim): the total with its standard errors and its
    split into L_T (prior), the sum of L_t for t >= 1 and L_0 (decoder); ``suffix`` "_cond" reads
    a conditional model's bound given the labels (``given`` is then said after the label)."""
    lines = []
    for names in BOUND_METRICS:
        label = names[0] + given
        total, stderr, stderr_images, prior, terms, decoder = (None if n is None else n + suffix for n in names[1:])
        if total not in metrics:
            continue
        line = f"{label} bound: {metrics[total]:.4f} bits/dim"
        errors = [f"{metrics[name]:.4f} {what}" for name, what in ((stderr, "from the timesteps"),
                                                                    (stderr_images, "over images")) if name in metrics]
        if errors:
            line += f" (s.e. {', '.join(errors)})"
        if all(name in metrics for name in (prior, terms, decoder)):
            line += (f" = L_T {metrics[prior]:.4f} + sum of L_t, t>=1, {metrics[terms]:.4f}"
                     f" + L_0 {metrics[decoder]:.4f}")
        lines.append(line)
    return lines


def sampler_settings_from_args(args: argparse.Namespace) -> SamplerSettings:
    """The grid's ``SamplerSettings`` from ``--sampler``, ``--sample-steps``, ``--spacing``,
    ``--corrector-steps``, ``--snr``, ``--order`` and ``--algorithm`` (DDIM's eta stays 0).

    Raises:
        ValueError: naming the field, on values ``SamplerSettings`` refuses.
    """
    return SamplerSettings(args.sampler, args.sample_steps, spacing=args.spacing,
                           corrector_steps=args.corrector_steps, snr=args.snr, order=args.order,
                           algorithm=args.algorithm)


def fd_settings_from_args(args: argparse.Namespace) -> FDSettings | None:
    """The ``FDSettings`` of ``--fd`` and its flags; ``None`` when ``--fd`` is 0.

    Raises:
        ValueError: naming the flag, on values ``FDSettings`` refuses.
    """
    if not args.fd:
        return None
    return FDSettings(images=args.fd, features=args.fd_features, classifier=args.fd_classifier,
                      inception_weights=args.inception_weights, reference_split=args.fd_reference_split,
                      reference_images=args.fd_reference_images, floor_split=args.fd_floor_split,
                      cache=args.fd_cache, workers=args.fd_workers, block_size=args.fd_block)


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` of the parsed command line."""
    return EvalSettings(
        model=args.model, shards=args.shards, images=args.images, estimate=args.estimate,
        exact_images=args.exact_images, workers=args.workers, samples=args.samples,
        sampling=sampler_settings_from_args(args), batch_size=args.batch_size, seed=args.seed,
        experiment=args.experiment, device=args.device, threads=args.threads, compile=args.compile,
        fd=fd_settings_from_args(args), split=args.split,
        class_labels=tuple(args.class_label) if args.class_label else None, guidance_scale=args.guidance_scale,
        guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
    )


def describe_conditional(metrics: dict[str, float], class_names: dict[int, str]) -> list[str]:
    """Human lines for a class-conditional model: the bound without and with labels and their
    difference (an estimate of the label's information in bits/dim, not a bound), and the class
    accuracy of the samples per class and overall."""
    lines = []
    for name in ("eval_bpd", "eval_bpd_estimate"):
        if name in metrics and f"{name}_cond" in metrics:
            lines.append(f"{name}: {metrics[name]:.4f} bits/dim without a label (-log p(x)), "
                         f"{metrics[name + '_cond']:.4f} with the true labels (-log p(x|y)); difference "
                         f"{metrics[name] - metrics[name + '_cond']:.4f} (an estimate of the label's information, "
                         "not a bound)")
    if "sample_class_accuracy" in metrics:
        per_class = ", ".join(f"{class_names.get(k, k)} {metrics[f'sample_class_accuracy_{k}']:.3f}"
                              for k in class_names if f"sample_class_accuracy_{k}" in metrics)
        lines.append(f"class accuracy of the samples: {metrics['sample_class_accuracy']:.3f} overall; {per_class}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints the numbers and where they were logged; exit code 2 on bad input."""
    args = parse_args(argv)
    try:
        outcome = evaluate(settings_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(outcome["metrics"], indent=2))
    for line in describe_bound(outcome["metrics"]):
        print(line)
    for line in describe_bound(outcome["metrics"], "_cond", " (given the true labels)"):
        print(line)
    for line in describe_conditional(outcome["metrics"], outcome.get("class_names", {})):
        print(line)
    print(f"MLflow run {outcome['run_id']} (experiment {outcome['experiment_id']}) at {outcome['run_at']}")
    print(f"artifacts: {outcome['artifact_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
