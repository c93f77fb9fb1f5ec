"""The Fréchet distance during training (``train.fd_every``): every worker draws its share of the
samples, rank 0 scores them.

At a due step each rank copies its EMA weights (identical on all ranks: DDP all-reduces the
gradients, so every replica applies the same update) into a UNet and draws the seeded blocks
``rank, rank + world_size, ...`` of the ``train.fd_images`` sample indices with the grids' sampler
(``evaluation.distributed_sampling.sample_blocks``: block b is seeded from (seed, b), so the images
do not depend on the number of workers). The parts are gathered on rank 0
(``torch.distributed.gather_object`` over the training process group), which computes their
features with the classifier of ``train.fd_classifier`` and the FD against the statistics of the
train split (computed once, cached with ``evaluation.fd.StatsCache``). The floor, the FD of
``fd_images`` real val images against the same reference, is computed with it on rank 0.
Every rank must call :meth:`TrainingFD.measure` at the same steps (it is a collective).

A class-conditional model (``model.num_classes`` = K) draws class-balanced samples: sample i has
the label i % K, sampled with classifier-free guidance at ``train.sample_guidance_scale``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.unet import UNet
from pipelines.evaluation.distributed_sampling import num_blocks, sample_blocks
from pipelines.evaluation.fd import (
    FeatureNet,
    FeatureStats,
    StatsCache,
    images_fd,
    reference_and_floor,
)
from pipelines.evaluation.features import build_feature_net
from pipelines.training.config import TrainConfig


def fd_block_size(num_images: int) -> int:
    """Images per seeded block of the FD samples: 16, or fewer so that there are at least 8 blocks
    (up to 8 workers share the work); a function of N alone, so the images do not depend on the
    number of workers."""
    return max(1, min(16, -(-num_images // 8)))


class TrainingFD:
    """FD of EMA samples at ``train.fd_every`` steps.

    Args:
        config: the run's config (``train.fd_every`` > 0, ``train.fd_classifier`` set).
        rank, world_size: this worker's place in the process group.

    On rank 0 the constructor loads the classifier and the reference statistics (cached after the
    first run on the same shards and classifier).

    Raises:
        ValueError: when the train or val split has too few images for ``fd_images``;
        FileNotFoundError: when the classifier is not found (rank 0).
    """

    def __init__(self, config: TrainConfig, rank: int, world_size: int) -> None:
        train = config.train
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.block_size = fd_block_size(train.fd_images)
        self.blocks = np.arange(num_blocks(train.fd_images, self.block_size))[rank::world_size]
        self.feature_net: FeatureNet | None = None
        self.reference: FeatureStats | None = None
        self.floor: float | None = None
        if rank == 0:
            self.feature_net = build_feature_net("classifier", classifier=train.fd_classifier)
            self.reference, self.floor = reference_and_floor(config.data.shards, train.fd_images, self.feature_net,
                                                             StatsCache(None))

    def due(self, step: int) -> bool:
        """Whether ``step`` (1-based optimizer steps) is an FD step."""
        return bool(self.config.train.fd_every) and step % self.config.train.fd_every == 0

    def measure(self, ema_net: UNet, diffusion: GaussianDiffusion, device: torch.device,
                with_floor: bool) -> dict[str, float] | None:
        """Draw this rank's blocks with ``ema_net`` (eval mode), gather them on rank 0 and score them.

        Returns:
            on rank 0 ``{"fd": float}`` (plus ``"fd_floor"`` when ``with_floor``); ``None`` elsewhere.
        """
        train = self.config.train
        num_classes = self.config.model.num_classes
        part = sample_blocks(diffusion, ema_net, self.config.model.image_shape, train.sampler_settings,
                             train.fd_images, self.block_size, train.seed, self.blocks, device=str(device),
                             classes=None if num_classes is None else range(num_classes),
                             guidance_scale=train.sample_guidance_scale)
        part.pop("label", None)  # i % K: a function of the index alone
        parts = self._gather(part)
        if parts is None:
            return None
        index = np.concatenate([p["index"] for p in parts])
        images = np.concatenate([p["image"] for p in parts])[np.argsort(index, kind="stable")]
        assert self.feature_net is not None and self.reference is not None
        result = {"fd": images_fd(self.feature_net, images, self.reference)}
        if with_floor:
            result["fd_floor"] = self.floor
        return result

    def _gather(self, part: dict[str, np.ndarray]) -> list[dict[str, Any]] | None:
        """Every rank's part on rank 0 (``None`` on the others)."""
        if self.world_size == 1 or not dist.is_initialized():
            return [part]
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(part, gathered, dst=0)
        return gathered
