"""Train the small CNN classifier whose penultimate layer is the FD's ``classifier`` features, on a
labelled shard folder (e.g. Fashion-MNIST with its labels), print its held-out accuracy, and log and
register it in MLflow (weights in safetensors + config.json).

    python pipelines/train_classifier.py --shards data/fashion-mnist-shards --epochs 5 --output outputs/fd-classifier

Then ``pipelines/evaluate.py --fd 1000 --fd-features classifier --fd-classifier models:/fd-classifier-fashion-mnist/1``
(or the output folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from pipelines.evaluation.classifier_job import (
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_NAME,
    ClassifierSettings,
    train_and_register,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line (see the module docstring); ``--help`` lists every option."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="labelled shard folder (local or s3://): train and val splits")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    parser.add_argument("--output", required=True, help="local folder for model.safetensors + config.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=None, help="default: largest training label + 1")
    parser.add_argument("--registered-name", default=DEFAULT_REGISTERED_NAME,
                        help="MLflow registered model name ('' logs without registering)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.add_argument("--no-mlflow", action="store_true", help="only save the folder")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    for name, low in {"epochs": 1, "batch_size": 1, "seed": 0, "num_classes": 2, "threads": 1}.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {low}")
    if not args.lr > 0:
        parser.error(f"--lr={args.lr} must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: prints the accuracy and where the classifier went; exit code 2 on bad input."""
    args = parse_args(argv)
    settings = ClassifierSettings(
        shards=args.shards, output=args.output, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, num_classes=args.num_classes, registered_name=args.registered_name or None,
        experiment=args.experiment, log=not args.no_mlflow, threads=args.threads)
    try:
        out = train_and_register(settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"val_accuracy": out["val_accuracy"], "train_accuracy": out["train_accuracy"],
                      "epoch_losses": out["losses"]}, indent=2))
    print(f"held-out accuracy: {out['val_accuracy']:.4f}")
    print(f"classifier: {out['folder']}")
    if out["run_id"]:
        print(f"MLflow run {out['run_id']} at {out['tracking_uri']}; model {out['model_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
