"""Evaluate a trained DDPM on held-out data: bits/dim (exact, with its per-timestep breakdown, or
estimated) and a sample grid, logged to MLflow as an evaluation of that model.

    python pipelines/evaluate.py --model models:/ddpm-tiny/1 --shards data/fashion-mnist-shards --images 64
    python pipelines/evaluate.py --model runs/<run>/checkpoint_00000200 --shards ... --estimate 16

``--model`` takes anything ``pipelines.model_store.fetch_checkpoint`` does (``models:/name/version``,
``models:/name@alias``, ``runs:/<id>/model``, ``s3://...``, a local checkpoint folder). The results
go to a new MLflow run tagged with the model URI, registered name/version and the run that trained
the model; the metrics are also linked to the logged model (MLflow 3 ``model_id``) and the
validation data (an MLflow dataset input), so they show on the model's page.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DEFAULT_EXPERIMENT = "ddpm-eval"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: its URI, the registered name/version and the MLflow logged-model
    id (``None`` when not registered), and the run that trained it (``None`` when unknown)."""

    uri: str
    name: str | None
    version: str | None
    model_id: str | None
    source_run_id: str | None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line (see the module docstring); ``--help`` lists every option."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/name/version, models:/name@alias, runs:/id/model, "
                                                        "s3://... or a local checkpoint folder")
    parser.add_argument("--shards", required=True,
                        help="preprocessed shard folder (local or s3://); its val split is used")
    parser.add_argument("--images", type=int, default=64, help="validation images to evaluate (first N of the split)")
    parser.add_argument("--estimate", type=int, default=0, metavar="K",
                        help="estimate the bound with K timesteps per image instead of computing it exactly")
    parser.add_argument("--samples", type=int, default=16, help="images in the sample grid (0: none)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grid")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bound's noise and the samples")
    parser.add_argument("--experiment", default=None,
                        help=f"MLflow experiment (default: the training run's, else {DEFAULT_EXPERIMENT!r})")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on CPU (default: torch's choice; 1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    minimums = {"images": 1, "estimate": 0, "samples": 0, "sample_steps": 1, "batch_size": 1, "seed": 0, "threads": 1}
    for name, low in minimums.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
    return args


def _logged_model_id(model_version: Any) -> str | None:
    """The MLflow 3 logged-model id behind a registered version: ``model_id``, or parsed from a
    ``models:/m-<id>`` source (the SQLite registry leaves ``model_id`` empty)."""
    if getattr(model_version, "model_id", None):
        return model_version.model_id
    source = model_version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def describe_model(uri: str, metadata: dict[str, Any], client: Any) -> ModelSource:
    """Registry facts about ``uri``: name/version/model id for ``models:/`` URIs, the training
    run from the registry, the ``runs:/`` URI or the checkpoint's metadata."""
    name = version = model_id = None
    run_id = metadata.get("mlflow_run_id")
    if uri.startswith("models:/"):
        ref = uri.removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.partition("/")
            mv = client.get_model_version(name, version)
        version, model_id, run_id = str(mv.version), _logged_model_id(mv), mv.run_id or run_id
    elif uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
    return ModelSource(uri=uri, name=name, version=version, model_id=model_id, source_run_id=run_id)


def load_validation(shards: str, image_shape: tuple[int, int, int], limit: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``limit`` validation images ``[N, C, H, W]`` (float32, [-1, 1]) and the manifest.

    Raises:
        ValueError: (``ShardError``) on a bad shard folder, or images of another shape than the model's.
    """
    from pipelines.shards import load_manifest, read_split_numpy

    manifest = load_manifest(shards)
    if tuple(manifest.image_shape) != tuple(image_shape):
        raise ValueError(f"--shards {shards} holds images of shape {list(manifest.image_shape)}, "
                         f"the model expects {list(image_shape)}")
    images, _ = read_split_numpy(shards, "val", limit=limit)
    if len(images) == 0:
        raise ValueError(f"--shards {shards} has no validation images")
    return images, manifest.to_dict()


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation and log it; returns the numbers and where they went."""
    import mlflow
    from mlflow import MlflowClient

    from diffusion_core.checkpoint import load_checkpoint
    from pipelines.mlflow_setup import ensure_experiment, resolve_tracking_uri
    from pipelines.model_eval import estimate_bpd, exact_bpd, plot_bpd_terms, sample_grid
    from pipelines.model_store import fetch_checkpoint
    from pipelines.storage import resolve
    from pipelines.tracking import log_png

    if args.threads:
        torch.set_num_threads(args.threads)
    tracking_uri = resolve_tracking_uri()
    client = MlflowClient(tracking_uri)
    folder = fetch_checkpoint(args.model)
    loaded = load_checkpoint(folder, device=args.device)
    source = describe_model(args.model, loaded.metadata, client)
    cfg = loaded.unet_config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
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
    if experiment is None and source.source_run_id:
        try:
            experiment = client.get_experiment(client.get_run(source.source_run_id).info.experiment_id).name
        except mlflow.exceptions.MlflowException:
            experiment = None
    experiment_id = ensure_experiment(client, experiment or DEFAULT_EXPERIMENT, tracking_uri)
    tags = {"eval.model_uri": source.uri, "eval.shards": shards, "eval.images": str(len(images)),
            "eval.method": f"estimate K={args.estimate}" if args.estimate else "exact calc_bpd_loop",
            "data.manifest_checksum": str(manifest.get("source_checksum", ""))}
    tags.update({k: v for k, v in (("eval.model_name", source.name), ("eval.model_version", source.version),
                                   ("eval.source_run_id", source.source_run_id)) if v})
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
            "tracking_uri": tracking_uri, "artifact_uri": run.info.artifact_uri, "model": source}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints the numbers and where they were logged; exit code 2 on bad input."""
    args = parse_args(argv)
    try:
        outcome = evaluate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(outcome["metrics"], indent=2))
    print(f"MLflow run {outcome['run_id']} (experiment {outcome['experiment_id']}) at {outcome['tracking_uri']}")
    print(f"artifacts: {outcome['artifact_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
