"""The bound over a whole split, spread over the Ray cluster (Ray Data over actors that hold the model).

The scored images are put once in Ray's object store; blocks of ``block_size`` consecutive images
are computed by ``metrics.bound_blocks`` on a pool of actors (``block_pool.map_blocks``: one CPU
each, or one GPU each when the cluster has GPUs), and the per-image rows come back in image order.
Each block seeds its own generator, so the figures equal :func:`metrics.bound_blocks` run in one
process on all blocks, whatever the number of actors
(``tests/test_split_consumers.py::test_evaluate_scores_a_whole_split_over_ray_actors``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipelines.common.ray_auth import connect_ray
from pipelines.evaluation.block_pool import ModelActor, checkpoint_files, map_blocks
from pipelines.evaluation.blocks import num_blocks
from pipelines.evaluation.metrics import bound_blocks


class _BoundActor(ModelActor):
    """A Ray Data actor holding one model and the scored images; computes the bound of each
    block of a batch of block ids."""

    def __init__(self, files: dict[str, bytes], images: list[Any], num_samples: int, block_size: int, seed: int,
                 use_gpu: bool, threads: int | None, class_labels: np.ndarray | None = None) -> None:
        super().__init__(files, use_gpu, threads)
        # ``images`` is [ObjectRef]: wrapped in a list so that Ray hands the actor the reference, not a copy.
        # The object store's array is read-only; torch wants a writable one, so it is copied once here.
        self.images = torch.from_numpy(np.array(ray.get(images[0]), dtype=np.float32)).to(self.device)
        self.labels = None if class_labels is None else torch.from_numpy(np.array(class_labels, dtype=np.int64))
        self.num_samples, self.block_size, self.seed = num_samples, block_size, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return bound_blocks(self.loaded.diffusion, self.loaded.model, self.images, self.num_samples, self.seed,
                            self.block_size, batch["id"], class_labels=self.labels)


def bound_distributed(
    checkpoint: str | Path, images: np.ndarray, num_samples: int, *, block_size: int = 64, seed: int = 0,
    workers: int = 2, use_gpu: bool | None = None, threads: int | None = 1, class_labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``metrics.bound_blocks`` of every block of ``images``, computed over Ray.

    Args:
        checkpoint: a local core checkpoint folder (``model.safetensors`` + ``config.json``).
        images: ``[M, C, H, W]`` float32 in [-1, 1], the whole scored set (M >= 1).
        num_samples: K >= 2 for the stratified estimate, 0 for the exact bound.
        block_size: images per block and forward pass (>= 1); seed: the base seed.
        workers: actors (>= 1), one CPU or GPU each; use_gpu: ``None``: when the cluster has GPUs.
        threads: torch intra-op threads per CPU actor.
        class_labels: for a class-conditional model, int64 ``[M]`` in [-1, K), one per image (the
            bound on -log p(x | y); -1: on -log p(x)); ``None``: the model as it is.

    Returns:
        the rows of ``bound_blocks`` for all M images, in image order.

    Raises:
        ValueError: on an empty image set, block_size or workers < 1; FileNotFoundError: on a
            missing checkpoint file; RuntimeError: if rows went missing.
    """
    if images.shape[0] < 1 or block_size < 1:
        raise ValueError(f"need >= 1 image and block_size >= 1, got {images.shape[0]} images, block_size {block_size}")
    files = checkpoint_files(checkpoint)
    connect_ray()
    kwargs = {"files": files, "images": [ray.put(np.ascontiguousarray(images, dtype=np.float32))],
              "num_samples": num_samples, "block_size": block_size, "seed": seed, "threads": threads,
              "class_labels": class_labels}
    return map_blocks(_BoundActor, kwargs, num_blocks(images.shape[0], block_size), images.shape[0],
                      workers=workers, use_gpu=use_gpu)
