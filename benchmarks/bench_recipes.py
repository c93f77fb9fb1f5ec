"""Which training recipe gives the best samples per CPU-hour: the sweep ``configs/sweeps/recipes.yaml`` run
by ``pipelines.tuning`` (every recipe trained for the same wall time), then every trial's model scored
the same way.

The sweep trains ``--config`` (default ``configs/fashion_mnist.yaml``) with each row's overrides (the
sweep's ``variants``, ``--rows``; one Ray Tune trial each) for ``--minutes`` of training wall time
(``train.max_minutes``; ``train.total_steps`` is raised to ``--max-steps`` so that the budget ends the
run), one trial at a time, on the local Ray cluster (or ``$RAY_ADDRESS``), nested under one MLflow parent
run. The rows: ``baseline`` (the config as it is), ``min_snr`` (Min-SNR-gamma weighting, gamma 5),
``v_min_snr`` (v prediction with it), ``edm`` (EDM's timestep distribution and loss weight, v prediction),
``bf16`` (bf16 autocast), ``ema_9999`` (EMA decay 0.9999) and ``bpd_baseline``
(``configs/fashion_mnist_bpd.yaml``'s recipe); the sweep file names each one's paper.

Each trial that logged a model is then scored (``scoring.py``, shared with ``bench_guidance.py`` and
``bench_bpd_configs.py``):

* FD: N = ``--images`` samples drawn in this process (``--threads``) with the sampler the docs recommend,
  SDE-DPM-Solver++(2M) on quadratic timesteps with ``--steps`` steps, their FD with the FD classifier's
  (``--classifier``) features against the train split, and the floor: the FD of the first N real val
  images against the same reference (FD / floor is the figure to compare; the FD's bias depends on N);
* class shares: the share of the samples the classifier puts in each class, its minimum and maximum
  over the classes and the total variation distance from uniform (a model that drops or favours classes
  shows it there, and the FD only partly);
* test bits/dim: the estimated bound on the first ``--test-images`` images of the shards' ``test`` split
  (``--estimate`` K stratified timesteps per image, over ``--workers`` Ray actors; logged as an
  evaluation run), with its standard error over images and L_0;
* the steps the run reached within the budget, its training throughput (the median of the run's logged
  ``images_per_s`` windows), the config values the recipes switch (and the row's overrides as written
  in the sweep), and the last ``fd`` / ``val_bpd`` the training run logged (``train_*``).

Prints a table and writes JSON (default ``benchmarks/results/bench_recipes.json``), rewritten after each
row; rows already in it are left out of the next sweep, so a study may be run in parts (``--rows``)::

    python benchmarks/bench_recipes.py --shards data/fashion-mnist-shards --minutes 30 \\
        --classifier models:/fd-classifier-fashion-mnist/1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from cli import add_threads, bench_parser
from mlflow import MlflowClient
from scoring import FDReference, class_shares, classifier_reference, draw_samples, recommended_settings, score_trial
from study import Study, add_study_arguments, check_study_arguments, open_study, run_study
from table import Column, format_table

from diffusion_core.checkpoint import load_checkpoint
from pipelines.data.shards.reader import load_manifest
from pipelines.evaluation.conditioning import predicted_classes
from pipelines.evaluation.fd import images_fd
from pipelines.registry.model_store import fetch_checkpoint
from pipelines.tuning.spec import SweepSpec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "bench_recipes"
SWEEP = ROOT / "configs" / "sweeps" / "recipes.yaml"
#: The config values each row reports (``scoring.score_trial``): column -> the trial's MLflow param.
SWITCHES = {
    "prediction": "diffusion.prediction", "loss": "diffusion.loss", "variance": "diffusion.variance",
    "loss_weighting": "diffusion.loss_weighting", "min_snr_gamma": "diffusion.min_snr_gamma",
    "timestep_distribution": "diffusion.timestep_distribution", "edm_sigma_data": "diffusion.edm_sigma_data",
    "schedule": "diffusion.schedule", "timestep_sampler": "train.timestep_sampler",
    "precision": "scaling.precision", "ema_decay": "train.ema_decay", "global_batch_size": "train.global_batch_size",
    "lr": "optimizer.lr", "model_channels": "model.model_channels",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; see ``--help``."""
    parser = bench_parser(SCRIPT, __doc__)
    add_study_arguments(parser, sweep=SWEEP, storage=ROOT / "outputs" / "bench_recipes_runs", name_prefix="recipes",
                        root=ROOT)
    parser.add_argument("--classifier", default="models:/fd-classifier-fashion-mnist/1",
                        help="the FD classifier: model URI or folder of pipelines/train_classifier.py")
    parser.add_argument("--images", type=int, default=2000, help="N, samples per FD (and the floor's N)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (SDE-DPM-Solver++(2M), quadratic)")
    parser.add_argument("--block", type=int, default=250, help="images per seeded block (one batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    add_threads(parser, 2, help="torch intra-op threads of the sampling (torch.set_num_threads)")
    parser.add_argument("--cache", default=None, help="FD statistics cache folder (default outputs/fd_cache)")
    args = parser.parse_args(argv)
    check_study_arguments(parser, args, {"images": 2, "steps": 2, "block": 1, "threads": 1})
    return args


def study_spec(raw: Mapping[str, Any], rows: Sequence[str] | None, done: Sequence[str], minutes: float,
               max_steps: int) -> SweepSpec:
    """The study's sweep with the variants ``rows`` (default: all) less those in ``done``, and the
    budget ``--minutes`` / ``--max-steps``.

    Raises:
        ValueError: a row that is not a variant of the sweep, or nothing left to run.
    """
    variants = dict(raw.get("variants") or {})
    unknown = sorted(set(rows or ()) - set(variants))
    if unknown:
        raise ValueError(f"--rows {unknown} are not variants of the sweep; it has {list(variants)}")
    left = {name: variants[name] or {} for name in (rows or variants) if name not in done}
    if not left:
        raise ValueError("every requested row is in the results already")
    return spec_from_dict({**raw, "variants": left,
                           "budget": {"train.max_minutes": minutes, "train.total_steps": max_steps}})


def median_images_per_s(client: MlflowClient, run_id: str) -> float | None:
    """The median of the run's logged ``images_per_s`` (one value per logging window); ``None`` when none."""
    values = [m.value for m in client.get_metric_history(run_id, "images_per_s")]
    return float(statistics.median(values)) if values else None


def sample_scores(model_uri: str, fd: FDReference, args: argparse.Namespace) -> dict[str, Any]:
    """FD, FD / floor and class shares of N samples of the model drawn with the recommended sampler
    (class-balanced at guidance scale 1 for a class-conditional model), and their wall seconds."""
    loaded = load_checkpoint(fetch_checkpoint(model_uri))
    num_classes = loaded.unet_config.num_classes
    torch.set_num_threads(args.threads)  # the bound's evaluation leaves the process at 1 thread
    started = time.perf_counter()
    samples = draw_samples(loaded, recommended_settings(args.steps), args.images, args.block, args.seed,
                           classes=None if num_classes is None else range(num_classes))["image"]
    seconds = time.perf_counter() - started
    value = images_fd(fd.net, samples, fd.reference)
    return {"images": len(samples), "fd": value, "fd_floor": fd.floor, "fd_over_floor": value / fd.floor,
            **class_shares(predicted_classes(fd.net.model, samples), fd.num_classes),
            "sample_seconds_per_image": seconds / len(samples)}


def recipe_row(trial: Mapping[str, Any], client: MlflowClient, study: Study, fd: FDReference,
               args: argparse.Namespace) -> dict[str, Any]:
    """One trial's row: its test bound and switches (``scoring.score_trial``), the row's overrides as the
    sweep writes them, its training throughput and its samples' scores (``sample_scores``).

    Raises:
        KeyError: a trial whose run has no model-URI tag, or whose variant is not in the sweep.
    """
    scored = score_trial(trial, client, study.shards, args.test_images, args.estimate, args.workers, SWITCHES,
                         logged_prefix="train_")
    return {"row": scored["row"], "overrides": dict(study.raw["variants"][trial["variant"]] or {}), **scored,
            "images_per_s": median_images_per_s(client, trial["run_id"]),
            **sample_scores(scored["model_uri"], fd, args)}


COLUMNS = (
    Column("row", "row", align="<"), Column("pred", "prediction"), Column("weighting", "loss_weighting"),
    Column("timesteps", "timestep_distribution"), Column("precision", "precision"), Column("ema", "ema_decay"),
    Column("steps", "steps"), Column("img/s", "images_per_s", ".1f"), Column("FD", "fd", ".2f"),
    Column("FD/floor", "fd_over_floor", ".2f"), Column("share min", "class_share_min", ".3f"),
    Column("share max", "class_share_max", ".3f"), Column("TV", "class_share_tv", ".3f"),
    Column("test bpd", "test_bpd", ".4f"), Column("s.e.", "test_bpd_stderr_images", ".3f"),
    Column("L_0", "decoder_bpd", ".3f"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """Text table of the rows."""
    return format_table(rows, COLUMNS)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    study = open_study(args, lambda raw, done: study_spec(raw, args.rows, done, args.minutes, args.max_steps))
    # what the scoring needs is checked before hours of training: the test split, the classifier, the floor
    if not load_manifest(study.shards).counts.get("test"):
        raise ValueError(f"--shards {study.shards} has no test split (the bound is scored on it); preprocess a "
                         "source that has one, e.g. the IDX t10k files")
    fd = classifier_reference(study.shards, args.images, args.classifier, args.cache)
    print(f"FD floor (N={args.images} real val images against the train split): {fd.floor:.3f}", flush=True)
    figures = {"classifier": args.classifier, "features": fd.net.identity, "images": args.images, "floor": fd.floor,
               "sampler": recommended_settings(args.steps).params(), "block": args.block, "seed": args.seed,
               "threads": args.threads, "test_images": args.test_images, "estimate_k": args.estimate}
    run_study(study, args, argv, SCRIPT, "recipes", table=table, figures=figures,
              score=lambda trial, client: recipe_row(trial, client, study, fd, args))


if __name__ == "__main__":
    main()
