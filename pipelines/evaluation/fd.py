"""Fréchet distance between two sets of feature vectors, reference statistics cached on disk, and
the "floor" (the distance of real held-out images to the same reference).

The Fréchet (2-Wasserstein) distance between the Gaussians N(mu1, S1) and N(mu2, S2) fitted to two
sets of features is

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

(Dowson & Landau 1982; used on Inception-v3 pool3 features as the FID by Heusel et al. 2017,
"GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", eq. 6). The
matrix square root is ``scipy.linalg.sqrtm``, with the same fallback as the reference
implementations (pytorch-fid, TTUR): when the product is singular, ``eps * I`` is added to both
covariances. The estimate is biased upward at small N (the sample covariances are noisy), so a
number is only comparable with others at the same N and with the floor: the FD of N real held-out
images against the same reference.

Statistics of a reference slice (split, first/last images) are computed once per feature network
and cached as ``<cache>/<key>.npz`` + ``<key>.json``; the key is the sha256 of the shards'
``source_checksum``, their preprocessing options and counts, the split, the slice and the feature
network's identity (e.g. the sha256 of its weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import scipy.linalg

from pipelines.common.paths import PROJECT_ROOT
from pipelines.data.shards.reader import load_manifest, read_split_numpy

#: Where reference statistics are cached when no folder is given.
DEFAULT_CACHE_DIR = PROJECT_ROOT / "outputs" / "fd_cache"
STATS_FORMAT_VERSION = 1


class FeatureNet(Protocol):
    """A feature network for the FD.

    Attributes:
        identity: a string that changes whenever the features would (e.g. ``"classifier:sha256:..."``);
            part of the cache key.
        dim: D, the length of one feature vector.
    """

    identity: str
    dim: int

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 images ``[N, C, H, W]`` in [-1, 1] -> float64 features ``[N, D]``."""


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fitted to N feature vectors.

    Attributes:
        mu: float64 ``[D]``, the mean.
        sigma: float64 ``[D, D]``, the unbiased sample covariance (``np.cov``, ddof = 1).
        n: N, the number of vectors (>= 2).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and covariance of ``features`` ``[N, D]`` (any float dtype; computed in float64).

    Raises:
        ValueError: unless ``features`` is 2-D with N >= 2 rows and finite values.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values")
    return FeatureStats(mu=x.mean(axis=0), sigma=np.atleast_2d(np.cov(x, rowvar=False)), n=int(x.shape[0]))


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (Heusel et al. 2017, eq. 6), in
    squared feature units, >= 0 up to rounding; symmetric in ``a`` and ``b``.

    The square root is ``scipy.linalg.sqrtm``; if it is not finite (singular product, e.g. N <= D),
    ``eps * I`` is added to both covariances first; an imaginary part left by rounding is dropped.

    Raises:
        ValueError: if the dimensions differ, or the imaginary part of the square root is not
            negligible (more than 1e-3 on the diagonal: the covariances are not valid).
    """
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
    diff = a.mu - b.mu
    with warnings.catch_warnings():  # a singular product is handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the matrix square root has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))


def features_in_batches(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``net.features`` over ``images`` ``[N, C, H, W]`` in batches; float64 ``[N, D]``."""
    parts = [net.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float64, copy=False) if parts else np.zeros((0, net.dim))


def images_fd(net: FeatureNet, images: np.ndarray, reference: FeatureStats, batch_size: int = 256) -> float:
    """The FD of ``images`` (float32 ``[N, C, H, W]`` in [-1, 1], N >= 2) under ``net`` against the
    ``reference`` statistics: ``frechet_distance(feature_stats(features), reference)``."""
    return frechet_distance(feature_stats(features_in_batches(net, images, batch_size)), reference)


@dataclass(frozen=True)
class RealSlice:
    """Which real images: ``split`` rows ``[start, start + count)`` (manifest order) of ``shards``."""

    shards: str
    split: str
    start: int
    count: int


def stats_key(manifest: dict[str, Any], split: str, start: int, count: int, feature_identity: str) -> str:
    """The cache key (64 hex digits) of the statistics of one real slice under one feature network:
    sha256 of the manifest's ``source_checksum``, ``options`` (split fraction, seed, size, ...),
    ``counts`` and ``image_shape``, the split, the slice and ``feature_identity``."""
    payload = {
        "format": STATS_FORMAT_VERSION, "source_checksum": manifest.get("source_checksum"),
        "options": manifest.get("options", {}), "counts": manifest.get("counts"),
        "image_shape": manifest.get("image_shape"), "split": split, "start": int(start), "count": int(count),
        "features": feature_identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StatsCache:
    """Feature statistics on disk: ``<folder>/<key>.npz`` (mu, sigma, n) + ``<key>.json`` (what
    the key stands for). Writes are atomic (temporary file + rename)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self.folder = Path(folder if folder is not None else DEFAULT_CACHE_DIR).expanduser().resolve()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, key: str) -> FeatureStats | None:
        """The cached statistics of ``key``, or ``None`` when there are none."""
        path = self.path(key)
        if not path.is_file():
            return None
        with np.load(path) as data:
            return FeatureStats(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                                n=int(data["n"]))

    def save(self, key: str, stats: FeatureStats, description: dict[str, Any]) -> Path:
        """Write ``stats`` under ``key`` (and ``description`` beside it); returns the ``.npz`` path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".npz.tmp", delete=False) as tmp:
            np.savez(tmp, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n))
        os.replace(tmp.name, self.path(key))
        (self.folder / f"{key}.json").write_text(json.dumps(description, indent=2, sort_keys=True, default=str))
        return self.path(key)


def slice_stats(
    real: RealSlice, net: FeatureNet, cache: StatsCache, batch_size: int = 256,
    on_compute: Callable[[RealSlice], None] | None = None,
) -> tuple[FeatureStats, bool]:
    """The statistics of a slice of real images under ``net``, from the cache when there.

    Returns:
        ``(stats, hit)``; ``hit`` is True when they came from the cache (then identical, bit for
        bit, to the ones computed the first time).

    Raises:
        ValueError: (``ShardError``) on bad shards, or when the split has fewer than
            ``start + count`` images.
    """
    manifest = load_manifest(real.shards).to_dict()
    available = int(manifest["counts"].get(real.split, 0))
    if real.start < 0 or real.count < 2 or real.start + real.count > available:
        raise ValueError(f"split {real.split!r} of {real.shards} has {available} images; rows "
                         f"[{real.start}, {real.start + real.count}) were asked for (at least 2)")
    key = stats_key(manifest, real.split, real.start, real.count, net.identity)
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    if on_compute is not None:
        on_compute(real)
    images, _ = read_split_numpy(real.shards, real.split, limit=real.start + real.count)
    stats = feature_stats(features_in_batches(net, images[real.start :], batch_size))
    cache.save(key, stats, {"shards": real.shards, "split": real.split, "start": real.start, "count": real.count,
                            "features": net.identity, "source_checksum": manifest.get("source_checksum"),
                            "dim": net.dim})
    return stats, False


def reference_and_floor_slices(
    shards: str, num_images: int, reference_split: str = "train", floor_split: str = "val",
    reference_images: int | None = None,
) -> tuple[RealSlice, RealSlice]:
    """The reference slice and the floor's slice of N = ``num_images`` held-out real images.

    The reference is the first ``reference_images`` (default: all available) of ``reference_split``.
    The floor is the first N images of ``floor_split``; when that is the reference split itself,
    it is its last N images and the reference stops before them (the two are disjoint).

    Raises:
        ValueError: if a split has too few images for N (the message names the split, the count and
            what to change), or N < 2.
    """
    if num_images < 2:
        raise ValueError(f"the FD needs at least 2 images, got {num_images}")
    counts = load_manifest(shards).counts
    ref_total, floor_total = int(counts.get(reference_split, 0)), int(counts.get(floor_split, 0))
    if floor_split == reference_split:
        room = ref_total - num_images
        floor = RealSlice(shards, floor_split, room, num_images)
    else:
        room = ref_total
        if floor_total < num_images:
            raise ValueError(f"the FD floor needs {num_images} held-out real images but split {floor_split!r} of "
                             f"{shards} has {floor_total}; lower --fd or choose another --fd-floor-split")
        floor = RealSlice(shards, floor_split, 0, num_images)
    wanted = room if reference_images is None else reference_images
    if wanted < 2 or wanted > room:
        raise ValueError(f"the FD reference needs {wanted if reference_images else 'at least 2'} images of split "
                         f"{reference_split!r} ({ref_total} there"
                         f"{f', {num_images} of them kept for the floor' if floor_split == reference_split else ''})")
    return RealSlice(shards, reference_split, 0, wanted), floor


def reference_and_floor(shards: str, num_images: int, net: FeatureNet, cache: StatsCache) -> tuple[FeatureStats, float]:
    """The statistics of the whole train split (the reference) and the floor: the FD of the first
    ``num_images`` real val images against it (both slices' statistics from ``cache`` when there).

    Raises:
        ValueError: as :func:`reference_and_floor_slices`.
    """
    reference_slice, floor_slice = reference_and_floor_slices(shards, num_images, "train", "val")
    reference, _ = slice_stats(reference_slice, net, cache)
    floor, _ = slice_stats(floor_slice, net, cache)
    return reference, frechet_distance(floor, reference)

