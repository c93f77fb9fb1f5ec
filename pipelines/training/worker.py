"""Who a training worker is (rank, world size, device), and the torch settings of its device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch

from pipelines.training.config import ScalingSection


@dataclass(frozen=True)
class Worker:
    """Who this worker is: its 0-based rank, the world size and its torch device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints."""
        return self.rank == 0


def current_worker() -> Worker:
    """This worker's rank, world size and device, from the Ray Train context (inside a Ray Train
    worker only)."""
    context = ray.train.get_context()
    return Worker(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())


def configure_torch(scaling: ScalingSection, device: torch.device) -> bool:
    """Threads on CPU (``torch.set_num_threads``: Ray sets OMP_NUM_THREADS to the reservation),
    TF32 matmuls on GPU. Returns whether bf16 autocast is on (``scaling.precision``: ``bf16``, or
    ``auto`` on CUDA)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return scaling.precision in ("auto", "bf16")
    torch.set_num_threads(scaling.torch_threads or max(1, math.ceil(scaling.cpus_per_worker)))
    return scaling.precision == "bf16"


def seed_from(*values: int) -> int:
    """A 63-bit seed derived from ``values`` (``numpy.random.SeedSequence``): distinct streams per
    (seed, rank, step) or (seed, epoch, rank) without overlapping integer seeds."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
