"""The FD stage of an evaluation: N samples drawn over Ray, their features, the FD against the
cached reference statistics, and the floor (N real held-out images against the same reference)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from diffusion_core.generate import SamplerSettings
from diffusion_core.guidance import GuidanceInterval
from pipelines.evaluation.distributed_sampling import sample_distributed
from pipelines.evaluation.fd import (
    FeatureNet,
    StatsCache,
    frechet_distance,
    images_fd,
    reference_and_floor_slices,
    slice_stats,
)


@dataclass(frozen=True)
class FDSettings:
    """The FD flags of ``pipelines/evaluate.py``.

    Attributes:
        images: N >= 2 samples (and real held-out images for the floor).
        features: "classifier" or "inception"; classifier: its URI or folder; inception_weights:
            the local ``inception-2015-12-05.pt``.
        reference_split: split whose statistics are the reference ("train");
        reference_images: its first R images (``None``: all, less the floor's when the floor shares the split).
        floor_split: split of the floor's N real images ("val"; the reference split takes its last N).
        cache: folder of cached statistics (``None``: ``fd.DEFAULT_CACHE_DIR``).
        workers: Ray actors drawing samples; block_size: images per seeded block.
    """

    images: int
    features: str = "classifier"
    classifier: str | None = None
    inception_weights: str | None = None
    reference_split: str = "train"
    reference_images: int | None = None
    floor_split: str = "val"
    cache: str | None = None
    workers: int = 2
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.images < 2:
            raise ValueError(f"--fd={self.images} must be >= 2 (a covariance needs 2 images)")
        if self.features not in ("classifier", "inception"):
            raise ValueError(f"--fd-features must be 'classifier' or 'inception', got {self.features!r}")
        if self.features == "classifier" and not self.classifier:
            raise ValueError("--fd-features classifier needs --fd-classifier URI_OR_FOLDER "
                             "(train one with pipelines/train_classifier.py)")
        for name in ("reference_split", "floor_split"):
            if getattr(self, name) not in ("train", "val"):
                raise ValueError(f"--fd-{name.replace('_', '-')} must be 'train' or 'val', got {getattr(self, name)!r}")
        if self.reference_images is not None and self.reference_images < 2:
            raise ValueError(f"--fd-reference-images={self.reference_images} must be >= 2")
        if self.workers < 1 or self.block_size < 1:
            raise ValueError(f"--fd-workers and --fd-block must be >= 1, got {self.workers}, {self.block_size}")


def run_fd(
    checkpoint: str | Path, shards: str, net: FeatureNet, fd: FDSettings, sampling: SamplerSettings, seed: int,
    threads: int | None = 1, classes: Sequence[int] | None = None, guidance_scale: float = 1.0,
    guidance_interval: GuidanceInterval | None = None,
) -> dict[str, Any]:
    """FD of N samples of ``checkpoint`` and the floor, against the reference of ``shards``; for a
    class-conditional model the samples are class-balanced over ``classes`` (sample i of class
    ``classes[i % len(classes)]``) and guided at ``guidance_scale``, only at the timesteps whose
    noise level sigma_t = sqrt(1 / abar_t - 1) lies in ``guidance_interval`` = (sigma_lo, sigma_hi]
    when given (Kynkaanniemi et al. 2024; the others use the conditional model)
    (``distributed_sampling.sample_distributed``).

    Returns:
        ``{"fd": float, "fd_floor": float, "reference": RealSlice, "floor": RealSlice,
        "reference_cache_hit": bool, "floor_cache_hit": bool, "samples": float32 [N, C, H, W]}``.

    Raises:
        ValueError: when a split has too few images, or the sampler does not fit the model;
            naming ``guidance_interval`` on an invalid interval (with ``classes``).
    """
    reference, floor = reference_and_floor_slices(shards, fd.images, fd.reference_split, fd.floor_split,
                                                  fd.reference_images)
    cache = StatsCache(fd.cache)
    ref_stats, ref_hit = slice_stats(reference, net, cache)
    floor_stats, floor_hit = slice_stats(floor, net, cache)
    samples = sample_distributed(checkpoint, sampling, fd.images, block_size=fd.block_size, seed=seed,
                                 workers=fd.workers, threads=threads, classes=classes,
                                 guidance_scale=guidance_scale, guidance_interval=guidance_interval)
    return {"fd": images_fd(net, samples, ref_stats), "fd_floor": frechet_distance(floor_stats, ref_stats),
            "reference": reference, "floor": floor, "reference_cache_hit": ref_hit, "floor_cache_hit": floor_hit,
            "cache_folder": str(cache.folder), "samples": samples}
