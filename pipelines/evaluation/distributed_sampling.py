"""Draw many samples of one model over the Ray cluster (Ray Data), for the FD.

The N images are cut into blocks of ``block_size`` consecutive sample indices (the last one
smaller); block b is drawn alone with a generator seeded from ``(seed, b)`` (``block_seed``), by
:func:`sample_blocks` on a pool of actors that each hold the model (``block_pool.map_blocks``).
Since every block is drawn by the same call with the same generator whichever actor gets it and
however many blocks a Ray batch carries, the images depend only on (model, sampler settings, N,
block_size, seed) and the hardware, not on how the work was split; :func:`sample_locally` is the
one-process reference.

A class-conditional model draws class-balanced samples: sample index i gets the label
``classes[i % len(classes)]`` (``metrics.class_balanced_labels``), sampled with classifier-free
guidance at ``guidance_scale`` (``diffusion_core.guidance``), only at the noise levels sigma_t =
sqrt(1 / abar_t - 1) inside ``guidance_interval`` when one is given (Kynkaanniemi et al. 2024,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality in Diffusion
Models"); the labels, like the noise, depend on the index alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.generate import SamplerSettings, generate
from diffusion_core.guidance import GuidanceInterval, check_guidance_interval
from pipelines.evaluation.block_pool import ModelActor, checkpoint_files, map_blocks
from pipelines.evaluation.blocks import block_range, block_seed, num_blocks
from pipelines.evaluation.metrics import class_balanced_labels

__all__ = ["block_seed", "num_blocks", "sample_blocks", "sample_distributed", "sample_locally"]


def sample_blocks(
    diffusion: Any, model: torch.nn.Module, image_shape: tuple[int, int, int], settings: SamplerSettings,
    num_images: int, block_size: int, seed: int, blocks: np.ndarray, device: str = "cpu",
    classes: Sequence[int] | None = None, guidance_scale: float = 1.0,
    guidance_interval: GuidanceInterval | None = None,
) -> dict[str, np.ndarray]:
    """Draw the given blocks, one ``generate`` call each.

    Args:
        classes: for a class-conditional model, the labels to balance over (sample i gets
            ``classes[i % len(classes)]``), drawn with guidance scale ``guidance_scale`` (only at
            the noise levels of ``guidance_interval`` when given, see ``generate``);
            ``None``: the model as it is (unconditional).

    Returns:
        ``{"index": int64 [M] sample indices, "image": float32 [M, C, H, W] (in [-1, 1] when
        clipped)}`` for the M images of ``blocks``, plus ``"label": int64 [M]`` with ``classes``.
    """
    indices, images, labels = [], [], []
    for block in np.asarray(blocks, dtype=np.int64).tolist():
        start, count = block_range(block, block_size, num_images)
        generator = torch.Generator(device=device).manual_seed(block_seed(seed, block))
        block_labels = None if classes is None else class_balanced_labels(count, classes, start)
        x = generate(diffusion, model, (count, *image_shape), settings, generator=generator, device=device,
                     class_labels=block_labels, guidance_scale=guidance_scale, guidance_interval=guidance_interval)
        images.append(x.float().cpu().numpy())
        indices.append(np.arange(start, start + count, dtype=np.int64))
        if block_labels is not None:
            labels.append(block_labels.numpy())
    if not images:
        empty = {"index": np.zeros((0,), np.int64), "image": np.zeros((0, *image_shape), np.float32)}
        return empty if classes is None else {**empty, "label": np.zeros((0,), np.int64)}
    out = {"index": np.concatenate(indices), "image": np.concatenate(images)}
    return out if classes is None else {**out, "label": np.concatenate(labels)}


def sample_locally(checkpoint: str | Path, settings: SamplerSettings, num_images: int, block_size: int, seed: int,
                   device: str = "cpu", classes: Sequence[int] | None = None,
                   guidance_scale: float = 1.0, guidance_interval: GuidanceInterval | None = None) -> np.ndarray:
    """The images :func:`sample_distributed` returns for the same arguments, drawn in this process
    (:func:`sample_blocks` on every block): float32 ``[N, C, H, W]``."""
    loaded = load_checkpoint(checkpoint, device=device)
    out = sample_blocks(loaded.diffusion, loaded.model, loaded.unet_config.image_shape, settings, num_images,
                        block_size, seed, np.arange(num_blocks(num_images, block_size)), device, classes,
                        guidance_scale, guidance_interval)
    return out["image"]


class _SamplerActor(ModelActor):
    """A Ray Data actor holding one model; draws the blocks of each batch of block ids."""

    def __init__(self, files: dict[str, bytes], settings: SamplerSettings, num_images: int, block_size: int,
                 seed: int, use_gpu: bool, threads: int | None, classes: Sequence[int] | None = None,
                 guidance_scale: float = 1.0, guidance_interval: GuidanceInterval | None = None) -> None:
        super().__init__(files, use_gpu, threads)
        self.settings, self.num_images, self.block_size, self.seed = settings, num_images, block_size, seed
        self.classes, self.guidance_scale, self.guidance_interval = classes, guidance_scale, guidance_interval

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = sample_blocks(self.loaded.diffusion, self.loaded.model, self.loaded.unet_config.image_shape,
                            self.settings, self.num_images, self.block_size, self.seed, batch["id"], self.device,
                            self.classes, self.guidance_scale, self.guidance_interval)
        out.pop("label", None)  # a function of the index alone: the caller knows it
        return out


def sample_distributed(
    checkpoint: str | Path, settings: SamplerSettings, num_images: int, *, block_size: int = 16, seed: int = 0,
    workers: int = 2, blocks_per_batch: int = 1, use_gpu: bool | None = None, threads: int | None = 1,
    classes: Sequence[int] | None = None, guidance_scale: float = 1.0,
    guidance_interval: GuidanceInterval | None = None,
) -> np.ndarray:
    """Draw ``num_images`` samples of the checkpoint folder over Ray (see the module docstring).

    Args:
        checkpoint: a local core checkpoint folder (``model.safetensors`` + ``config.json``).
        settings: the sampler; num_images: N >= 1; block_size: images per seeded block (>= 1).
        seed: the base seed; workers: actors in the pool (>= 1), each with 1 CPU (or 1 GPU).
        blocks_per_batch: blocks per Ray Data batch (changes the split, not the images).
        use_gpu: one GPU per actor (``None``: when the cluster has GPUs).
        threads: torch intra-op threads per CPU actor.
        classes: for a class-conditional model, the labels to balance over (sample i gets
            ``classes[i % len(classes)]``, ``metrics.class_balanced_labels``), drawn with
            classifier-free guidance at ``guidance_scale``; ``None``: unconditional.
        guidance_interval: with ``classes``, ``(sigma_lo, sigma_hi)``: guide only the timesteps
            with sigma_lo < sigma_t <= sigma_hi, sigma_t = sqrt(1 / abar_t - 1), and use the
            conditional model at the others (Kynkaanniemi et al. 2024; ``generate``); ``None``:
            guide every timestep.

    Returns:
        float32 ``[N, C, H, W]`` in sample-index order.

    Raises:
        ValueError: on N, block_size, workers or blocks_per_batch < 1; naming
            ``guidance_interval`` on an invalid interval (checked here, before any actor starts,
            when ``classes`` are given); FileNotFoundError: on a missing checkpoint file.
    """
    for name, value in (("num_images", num_images), ("block_size", block_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if classes is not None and guidance_interval is not None:
        check_guidance_interval(guidance_interval)
        guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
    kwargs = {"files": checkpoint_files(checkpoint), "settings": settings, "num_images": num_images,
              "block_size": block_size, "seed": seed, "threads": threads,
              "classes": None if classes is None else [int(c) for c in classes], "guidance_scale": guidance_scale,
              "guidance_interval": guidance_interval}
    out = map_blocks(_SamplerActor, kwargs, num_blocks(num_images, block_size), num_images, workers=workers,
                     blocks_per_batch=blocks_per_batch, use_gpu=use_gpu)
    return out["image"].astype(np.float32, copy=False)
