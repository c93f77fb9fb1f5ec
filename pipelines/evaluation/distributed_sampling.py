"""Draw many samples of one model over the Ray cluster (Ray Data), for the FD.

The N images are cut into blocks of ``block_size`` consecutive sample indices (the last one
smaller); block b is drawn alone with a generator seeded from ``(seed, b)`` (``block_seed``). Ray
Data maps ``ray.data.range(num_blocks)`` with ``map_batches`` onto a fixed pool of actors that each
hold the model (``concurrency=workers``; one GPU each when the cluster has GPUs). Since every block
is drawn by the same call with the same generator whichever actor gets it and however many blocks
a Ray batch carries, the images depend only on (model, sampler settings, N, block_size, seed) and
the hardware, not on how the work was split; :func:`sample_locally` is the one-process reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from diffusion_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from diffusion_core.generate import SamplerSettings, generate
from pipelines.ray_auth import connect_ray


def block_seed(seed: int, block: int) -> int:
    """The seed of block ``block`` (a 63-bit int from ``numpy.random.SeedSequence([seed, block])``)."""
    state = np.random.SeedSequence([int(seed), int(block)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def num_blocks(num_images: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``num_images`` sample indices."""
    return -(-num_images // block_size)


def sample_blocks(
    diffusion: Any, model: torch.nn.Module, image_shape: tuple[int, int, int], settings: SamplerSettings,
    num_images: int, block_size: int, seed: int, blocks: np.ndarray, device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Draw the given blocks, one ``generate`` call each.

    Returns:
        ``{"index": int64 [M] sample indices, "image": float32 [M, C, H, W] (in [-1, 1] when
        clipped)}`` for the M images of ``blocks``.
    """
    indices, images = [], []
    for block in np.asarray(blocks, dtype=np.int64).tolist():
        start = block * block_size
        count = min(block_size, num_images - start)
        generator = torch.Generator(device=device).manual_seed(block_seed(seed, block))
        x = generate(diffusion, model, (count, *image_shape), settings, generator=generator, device=device)
        images.append(x.float().cpu().numpy())
        indices.append(np.arange(start, start + count, dtype=np.int64))
    if not images:
        return {"index": np.zeros((0,), np.int64), "image": np.zeros((0, *image_shape), np.float32)}
    return {"index": np.concatenate(indices), "image": np.concatenate(images)}


def sample_locally(checkpoint: str | Path, settings: SamplerSettings, num_images: int, block_size: int, seed: int,
                   device: str = "cpu") -> np.ndarray:
    """The images :func:`sample_distributed` returns, drawn in this process: float32 ``[N, C, H, W]``."""
    loaded = load_checkpoint(checkpoint, device=device)
    out = sample_blocks(loaded.diffusion, loaded.model, loaded.unet_config.image_shape, settings, num_images,
                        block_size, seed, np.arange(num_blocks(num_images, block_size)), device)
    return out["image"]


class _SamplerActor:
    """A Ray Data actor holding one model (rebuilt from the checkpoint's bytes, so no shared disk is needed)."""

    def __init__(self, files: dict[str, bytes], settings: SamplerSettings, num_images: int, block_size: int,
                 seed: int, use_gpu: bool, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self._tmp = tempfile.TemporaryDirectory(prefix="fd-sampler-")
        for name, data in files.items():
            Path(self._tmp.name, name).write_bytes(data)
        self.loaded = load_checkpoint(self._tmp.name, device=self.device)
        self.settings, self.num_images, self.block_size, self.seed = settings, num_images, block_size, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return sample_blocks(self.loaded.diffusion, self.loaded.model, self.loaded.unet_config.image_shape,
                             self.settings, self.num_images, self.block_size, self.seed, batch["id"], self.device)


def sample_distributed(
    checkpoint: str | Path, settings: SamplerSettings, num_images: int, *, block_size: int = 16, seed: int = 0,
    workers: int = 2, blocks_per_batch: int = 1, use_gpu: bool | None = None, threads: int | None = 1,
) -> np.ndarray:
    """Draw ``num_images`` samples of the checkpoint folder over Ray (see the module docstring).

    Args:
        checkpoint: a local core checkpoint folder (``model.safetensors`` + ``config.json``).
        settings: the sampler; num_images: N >= 1; block_size: images per seeded block (>= 1).
        seed: the base seed; workers: actors in the pool (>= 1), each with 1 CPU (or 1 GPU).
        blocks_per_batch: blocks per Ray Data batch (changes the split, not the images).
        use_gpu: one GPU per actor (``None``: when the cluster has GPUs).
        threads: torch intra-op threads per CPU actor.

    Returns:
        float32 ``[N, C, H, W]`` in sample-index order.

    Raises:
        ValueError: on N, block_size, workers or blocks_per_batch < 1; FileNotFoundError: on a
            missing checkpoint file.
    """
    for name, value in (("num_images", num_images), ("block_size", block_size), ("workers", workers),
                        ("blocks_per_batch", blocks_per_batch)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    folder = Path(checkpoint)
    files = {}
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder.resolve()} has no {name}")
        files[name] = (folder / name).read_bytes()
    connect_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    blocks = num_blocks(num_images, block_size)
    dataset = ray.data.range(blocks, override_num_blocks=min(blocks, max(1, workers * 2)))
    sampled = dataset.map_batches(
        _SamplerActor, batch_size=blocks_per_batch, batch_format="numpy", concurrency=min(workers, blocks),
        fn_constructor_kwargs={"files": files, "settings": settings, "num_images": num_images,
                               "block_size": block_size, "seed": seed, "use_gpu": use_gpu, "threads": threads},
        num_gpus=1 if use_gpu else 0, num_cpus=1,
    )
    indices, images = [], []
    for batch in sampled.iter_batches(batch_size=None, batch_format="numpy"):
        indices.append(batch["index"])
        images.append(batch["image"])
    index, image = np.concatenate(indices), np.concatenate(images)
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(num_images)):
        raise RuntimeError(f"Ray Data returned sample indices {index[order][:8]}..., expected 0..{num_images - 1}")
    return image[order].astype(np.float32, copy=False)
