"""An evaluation of one model: held-out bits/dim (exact with its per-timestep breakdown, or
estimated) and a sample grid, logged to MLflow as a run of its own tagged with the model it scored.

The metrics are also linked to the logged model (MLflow 3 ``model_id``) and to the validation data
(an MLflow dataset input), so they show on the model's page. ``pipelines/evaluate.py`` is the
command line around :func:`evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

from diffusion_core.checkpoint import load_checkpoint
from pipelines.data.shards import load_manifest, read_split_numpy
from pipelines.data.storage import resolve
from pipelines.evaluation.metrics import estimate_bpd, exact_bpd, plot_bpd_terms, sample_grid
from pipelines.registry.model_identity import describe_model
from pipelines.registry.model_store import fetch_checkpoint
from pipelines.registry.runs import log_png
from pipelines.registry.tracking_uri import ensure_experiment, resolve_tracking_uri, run_location

DEFAULT_EXPERIMENT = "ddpm-eval"


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how (the flags of ``pipelines/evaluate.py``).

    Attributes:
        model: a model URI or checkpoint folder (anything ``fetch_checkpoint`` takes).
        shards: the shard folder (local or s3://) whose ``val`` split is scored.
        images: the first N >= 1 validation images.
        estimate: K timesteps per image for the estimated bound; 0 computes the exact bound.
        samples: images in the sample grid (0: none); sample_steps: its DDIM steps.
        batch_size: images per forward pass; seed: seed of the bound's noise and the samples.
        experiment: MLflow experiment (``None``: the training run's, else ``DEFAULT_EXPERIMENT``).
        device: torch device; threads: torch intra-op threads (``None``: torch's choice).
    """

    model: str
    shards: str
    images: int = 64
    estimate: int = 0
    samples: int = 16
    sample_steps: int = 50
    batch_size: int = 64
    seed: int = 0
    experiment: str | None = None
    device: str = "cpu"
    threads: int | None = None


def load_validation(shards: str, image_shape: tuple[int, int, int], limit: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``limit`` validation images ``[N, C, H, W]`` (float32, [-1, 1]) and the manifest.

    Raises:
        ValueError: (``ShardError``) on a bad shard folder, or images of another shape than the model's.
    """
    manifest = load_manifest(shards)
    if tuple(manifest.image_shape) != tuple(image_shape):
        raise ValueError(f"--shards {shards} holds images of shape {list(manifest.image_shape)}, "
                         f"the model expects {list(image_shape)}")
    images, _ = read_split_numpy(shards, "val", limit=limit)
    if len(images) == 0:
        raise ValueError(f"--shards {shards} has no validation images")
    return images, manifest.to_dict()


def evaluate(args: EvalSettings) -> dict[str, Any]:
    """Run the evaluation and log it.

    Returns:
        ``{"metrics": {name: bits/dim}, "run_id", "experiment_id", "tracking_uri", "run_at", "artifact_uri",
        "model": ModelIdentity}`` (``run_at``: the run's UI page on a tracking server, else the
        tracking URI; ``registry.tracking_uri.run_location``).

    Raises:
        ValueError / FileNotFoundError: on a bad model URI, a missing model or bad shards.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    tracking_uri = resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    folder = fetch_checkpoint(args.model)
    loaded = load_checkpoint(folder, device=args.device)
    source = describe_model(args.model, loaded.metadata, client)
    shape = loaded.unet_config.image_shape
    shards = resolve(args.shards).uri
    images, manifest = load_validation(shards, shape, args.images)
    x = torch.from_numpy(images).to(args.device)
    if args.estimate:
        result = estimate_bpd(loaded.diffusion, loaded.model, x, args.estimate, args.seed, args.batch_size)
        metrics = {"eval_bpd_estimate": result["bpd"], "eval_bpd_estimate_stderr": result["bpd_stderr"]}
        plot = None
    else:
        result = exact_bpd(loaded.diffusion, loaded.model, x, args.seed, args.batch_size)
        metrics = {"eval_bpd": result["bpd"], "eval_prior_bpd": result["prior_bpd"],
                   "eval_decoder_bpd": float(result["vb_per_t"][0])}
        plot = plot_bpd_terms(result["vb_per_t"], result["prior_bpd"], f"{args.model}: {result['bpd']:.3f} bits/dim")
    grid = None
    if args.samples:
        grid = sample_grid(loaded.diffusion, loaded.model, shape, args.samples, args.sample_steps, args.seed)[1]

    experiment = args.experiment
    if experiment is None and source.run_id:
        try:
            experiment = client.get_experiment(client.get_run(source.run_id).info.experiment_id).name
        except mlflow.exceptions.MlflowException:
            experiment = None
    experiment_id = ensure_experiment(client, experiment or DEFAULT_EXPERIMENT, tracking_uri)
    tags = {"eval.model_uri": source.uri, "eval.shards": shards, "eval.images": str(len(images)),
            "eval.method": f"estimate K={args.estimate}" if args.estimate else "exact calc_bpd_loop",
            "data.manifest_checksum": str(manifest.get("source_checksum", ""))}
    tags.update({k: v for k, v in (("eval.model_name", source.name), ("eval.model_version", source.version),
                                   ("eval.source_run_id", source.run_id)) if v})
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{Path(source.uri).name}", tags=tags) as run:
        dataset = mlflow.data.from_numpy(images, source=shards, name=f"val[:{len(images)}]",
                                         digest=str(manifest.get("source_checksum", ""))[:36] or None)
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_params({"images": len(images), "estimate_k": args.estimate, "seed": args.seed,
                           "samples": args.samples, "sample_steps": args.sample_steps})
        mlflow.log_metrics(metrics, model_id=source.model_id, dataset=dataset)
        if plot is not None:
            log_png(client, run.info.run_id, plot, "eval/bpd_per_timestep.png")
            mlflow.log_dict({"vb_per_t_bpd": result["vb_per_t"].tolist(), "prior_bpd": result["prior_bpd"]},
                            "eval/bpd_terms.json")
        if grid is not None:
            log_png(client, run.info.run_id, grid, "eval/samples.png")
    return {"metrics": metrics, "run_id": run.info.run_id, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "run_at": run_location(tracking_uri, run.info.run_id, experiment_id),
            "artifact_uri": run.info.artifact_uri, "model": source}
