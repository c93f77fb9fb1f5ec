"""The images (and, for a class-conditional model, the class labels) a worker trains and evaluates
on: its shard of the ``train`` split, epoch after epoch, and the fixed ``val`` subset rank 0 scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import ray.train
import torch

from pipelines.data.shards.reader import read_split_numpy
from pipelines.training.config import TrainConfig
from pipelines.training.splits import training_split
from pipelines.training.worker import Worker, seed_from


@dataclass(frozen=True)
class TrainingBatch:
    """One worker's part of a global batch.

    Attributes:
        images: x_0, float32 ``[n, C, H, W]`` in [-1, 1], on the worker's device.
        labels: the shards' class labels, int64 ``[n]`` in [0, num_classes), on the same device,
            for a class-conditional model (``model.num_classes`` set); ``None`` for an
            unconditional one (its dataset carries no label column).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None


def iterate_epochs(config: TrainConfig, worker: Worker) -> Iterator[TrainingBatch]:
    """Batches of this worker's shard (``ray.train.get_dataset_shard("train")``), epoch after epoch,
    ``n`` = per-worker batch size images each (incomplete batches dropped); with the class labels
    when ``model.num_classes`` is set (``launcher.build_trainer`` then selects the "label" column).

    Raises:
        RuntimeError: if an epoch yields no batch (the shard is smaller than one batch).
        ValueError: on a label outside [0, ``model.num_classes``) in a conditional run.
    """
    shard = ray.train.get_dataset_shard("train")
    buffer = config.data.local_shuffle_buffer or None
    num_classes = config.model.num_classes
    dtypes = torch.float32 if num_classes is None else {"image": torch.float32, "label": torch.int64}
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=config.per_worker_batch_size, drop_last=True, dtypes=dtypes,
            device=worker.device, local_shuffle_buffer_size=buffer,
            local_shuffle_seed=seed_from(config.train.seed, epoch, worker.rank) if buffer else None,
        ):
            count += 1
            yield TrainingBatch(batch["image"], None if num_classes is None else checked_labels(batch["label"],
                                                                                                  num_classes))
        if count == 0:
            raise RuntimeError(
                f"worker {worker.rank} got no full batch of {config.per_worker_batch_size} images in an epoch"
            )
        epoch += 1


def checked_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``labels`` (int64 ``[n]``) when every one lies in [0, ``num_classes``).

    Raises:
        ValueError: naming ``model.num_classes`` and the offending range (an unlabelled row has -1).
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"training labels span [{int(labels.min())}, {int(labels.max())}], outside "
                         f"[0, model.num_classes={num_classes}) (an unlabelled row holds -1)")
    return labels


def load_val_subset(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation subset for bits/dim (the first images of the ``val`` split): images
    ``[N, C, H, W]`` float32 in [-1, 1] and their labels int64 ``[N]`` (-1 where unknown); both
    empty when neither ``train.bpd_every`` nor ``train.final_bpd_images`` needs one."""
    count = max(config.train.bpd_images if config.train.bpd_every else 0, config.train.final_bpd_images)
    if count == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    images, labels = read_split_numpy(config.data.shards, training_split("val"), limit=count)
    return torch.from_numpy(images), torch.from_numpy(labels.astype("int64", copy=False))


def load_val_images(config: TrainConfig) -> torch.Tensor:
    """The images of :func:`load_val_subset`, ``[N, C, H, W]`` float32 in [-1, 1]."""
    return load_val_subset(config)[0]
