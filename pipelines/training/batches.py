"""The images a worker trains and evaluates on: its shard of the ``train`` split, epoch after epoch,
and the fixed ``val`` subset rank 0 scores."""

from __future__ import annotations

from typing import Iterator

import ray.train
import torch

from pipelines.data.shards.reader import read_split_numpy
from pipelines.training.config import TrainConfig
from pipelines.training.splits import training_split
from pipelines.training.worker import Worker, seed_from


def iterate_epochs(config: TrainConfig, worker: Worker) -> Iterator[torch.Tensor]:
    """Images ``[n, C, H, W]`` (float32 in [-1, 1], on the worker's device) of this worker's shard
    (``ray.train.get_dataset_shard("train")``), epoch after epoch, ``n`` = per-worker batch size
    (incomplete batches dropped).

    Raises:
        RuntimeError: if an epoch yields no batch (the shard is smaller than one batch).
    """
    shard = ray.train.get_dataset_shard("train")
    buffer = config.data.local_shuffle_buffer or None
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=config.per_worker_batch_size, drop_last=True, dtypes=torch.float32,
            device=worker.device, local_shuffle_buffer_size=buffer,
            local_shuffle_seed=seed_from(config.train.seed, epoch, worker.rank) if buffer else None,
        ):
            count += 1
            yield batch["image"]
        if count == 0:
            raise RuntimeError(
                f"worker {worker.rank} got no full batch of {config.per_worker_batch_size} images in an epoch"
            )
        epoch += 1


def load_val_images(config: TrainConfig) -> torch.Tensor:
    """The fixed validation subset for bits/dim (the first images of the ``val`` split),
    [N, C, H, W] float32 in [-1, 1]; empty when neither ``train.bpd_every`` nor
    ``train.final_bpd_images`` needs one."""
    count = max(config.train.bpd_images if config.train.bpd_every else 0, config.train.final_bpd_images)
    if count == 0:
        return torch.empty(0)
    images, _ = read_split_numpy(config.data.shards, training_split("val"), limit=count)
    return torch.from_numpy(images)
