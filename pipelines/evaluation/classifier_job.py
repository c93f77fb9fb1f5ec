"""Train the FD classifier on a labelled shard folder, save it, log and register it in MLflow
(``pipelines/train_classifier.py`` is the command line around :func:`train_and_register`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.data.shards.reader import load_manifest, read_split_numpy
from pipelines.data.storage import resolve
from pipelines.evaluation.classifier import ClassifierConfig, accuracy, save_classifier, train_classifier
from pipelines.registry.feature_store import log_feature_net_run

ENTRY_FILE = Path(__file__).resolve().with_name("classifier_pyfunc_entry.py")
DEFAULT_EXPERIMENT = "fd-classifier"
DEFAULT_REGISTERED_NAME = "fd-classifier-fashion-mnist"


@dataclass(frozen=True)
class ClassifierSettings:
    """The flags of ``pipelines/train_classifier.py``.

    Attributes:
        shards: labelled shard folder (local or s3://): trained on ``train``, accuracy on ``val``.
        output: local folder for ``model.safetensors`` + ``config.json``.
        epochs, batch_size, lr, seed: training (Adam, cross-entropy, CPU).
        num_classes: K (``None``: the largest training label + 1, at least 2).
        registered_name: MLflow registered model name (``None``: log without registering).
        experiment: MLflow experiment; log: False skips MLflow entirely.
        threads: torch intra-op threads (``None``: torch's choice).
    """

    shards: str
    output: str
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    num_classes: int | None = None
    registered_name: str | None = DEFAULT_REGISTERED_NAME
    experiment: str = DEFAULT_EXPERIMENT
    log: bool = True
    threads: int | None = None


def train_and_register(settings: ClassifierSettings) -> dict[str, Any]:
    """Train, save, report held-out accuracy, log and register.

    Returns:
        ``{"folder": absolute output folder, "val_accuracy", "train_accuracy", "losses",
        "weights_sha256", "run_id", "tracking_uri", "model_uri"}`` (the last three ``None`` when
        ``log`` is False).

    Raises:
        ValueError: on unlabelled shards (labels -1), bad settings or bad shards.
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    shards = resolve(settings.shards).uri
    manifest = load_manifest(shards)
    images, labels = read_split_numpy(shards, "train")
    val_images, val_labels = read_split_numpy(shards, "val")
    if len(images) == 0 or labels.min() < 0:
        raise ValueError(f"--shards {shards}: the classifier needs labelled training images "
                         f"({len(images)} images, has_labels={manifest.has_labels}); preprocess a labelled source")
    num_classes = settings.num_classes or max(2, int(labels.max()) + 1)
    config = ClassifierConfig(image_shape=tuple(manifest.image_shape), num_classes=num_classes)
    model, losses = train_classifier(images, labels, config, settings.epochs, settings.batch_size, settings.lr,
                                     settings.seed)
    labelled = val_labels >= 0
    val_acc = accuracy(model, val_images[labelled], val_labels[labelled])
    train_acc = accuracy(model, images, labels)
    folder = save_classifier(settings.output, model, {
        "shards": shards, "source_checksum": manifest.source_checksum, "epochs": settings.epochs,
        "val_accuracy": val_acc, "train_images": len(images), "val_images": int(labelled.sum()),
    })
    out: dict[str, Any] = {"folder": str(folder), "val_accuracy": val_acc, "train_accuracy": train_acc,
                           "losses": losses, "run_id": None, "tracking_uri": None, "model_uri": None}
    if settings.log:
        params = {"epochs": settings.epochs, "batch_size": settings.batch_size, "lr": settings.lr,
                  "seed": settings.seed, "num_classes": num_classes, "feature_dim": config.feature_dim,
                  "train_images": len(images), "val_images": int(labelled.sum())}
        metrics = {"val_accuracy": val_acc, "train_accuracy": train_acc, "final_train_loss": losses[-1]}
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        tracking_uri, run_id, ref = log_feature_net_run(
            folder, ENTRY_FILE, experiment=settings.experiment, run_name=f"fd-classifier-{Path(folder).name}",
            params=params, metrics=metrics, registered_model_name=settings.registered_name,
            tags={"data.manifest_checksum": manifest.source_checksum, "data.shards": shards})
        out.update(run_id=run_id, tracking_uri=tracking_uri, model_uri=ref.model_uri)
    return out
