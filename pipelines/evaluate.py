"""Evaluate a trained DDPM on held-out data: bits/dim (exact, with its per-timestep breakdown, or
estimated) and a sample grid, logged to MLflow as an evaluation of that model.

    python pipelines/evaluate.py --model models:/ddpm-tiny/1 --shards data/fashion-mnist-shards --images 64
    python pipelines/evaluate.py --model runs/<run>/checkpoint_00000200 --shards ... --estimate 16

``--model`` takes anything ``pipelines.registry.model_store.fetch_checkpoint`` does (``models:/name/version``,
``models:/name@alias``, ``runs:/<id>/model``, ``s3://...``, a local checkpoint folder). The results
go to a new MLflow run tagged with the model URI, registered name/version and the run that trained
the model; the metrics are also linked to the logged model (MLflow 3 ``model_id``) and the
validation data (an MLflow dataset input), so they show on the model's page.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pipelines.evaluation.job import DEFAULT_EXPERIMENT, EvalSettings, evaluate


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


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The ``EvalSettings`` of the parsed command line."""
    return EvalSettings(
        model=args.model, shards=args.shards, images=args.images, estimate=args.estimate, samples=args.samples,
        sample_steps=args.sample_steps, batch_size=args.batch_size, seed=args.seed, experiment=args.experiment,
        device=args.device, threads=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints the numbers and where they were logged; exit code 2 on bad input."""
    args = parse_args(argv)
    try:
        outcome = evaluate(settings_from_args(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(outcome["metrics"], indent=2))
    print(f"MLflow run {outcome['run_id']} (experiment {outcome['experiment_id']}) at {outcome['run_at']}")
    print(f"artifacts: {outcome['artifact_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
