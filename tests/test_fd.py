"""The Fréchet distance against closed forms (including non-commuting covariances) and against an
independent implementation (torchmetrics' eigenvalue formula), the statistics cache, the seeded
blocks of the FD sampler, the Inception missing-file error and the FD flags (fast: no Ray, no MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _unet_helpers import computing_unet
from torchmetrics.image.fid import _compute_fid as torchmetrics_fid

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.generate import SamplerSettings
from diffusion_core.unet import UNet
from pipelines.evaluate import parse_args
from pipelines.evaluation.distributed_sampling import block_seed, sample_blocks, sample_locally
from pipelines.evaluation.fd import FeatureStats, StatsCache, feature_stats, frechet_distance, stats_key
from pipelines.evaluation.features import INCEPTION_FILE, InceptionFeatures, build_feature_net

TINY_UNET = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                       num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_heads=1)


def _analytic_diag(mu1, var1, mu2, var2) -> float:
    """||mu1 - mu2||^2 + sum(v1 + v2 - 2 sqrt(v1 v2)) for diagonal covariances."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_exact_statistics_match_the_closed_form() -> None:
    mu1, var1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25])
    mu2, var2 = np.array([1.0, 1.0, 0.0]), np.array([9.0, 1.0, 0.25])
    a, b = FeatureStats(mu1, np.diag(var1), 10), FeatureStats(mu2, np.diag(var2), 10)
    assert frechet_distance(a, b) == pytest.approx(_analytic_diag(mu1, var1, mu2, var2), rel=1e-10)
    # equal covariances: only the means count; a full (non-diagonal) covariance
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 4))
    sigma = m @ m.T + np.eye(4)
    c = FeatureStats(np.zeros(4), sigma, 10)
    d = FeatureStats(np.full(4, 0.5), sigma, 10)
    assert frechet_distance(c, d) == pytest.approx(1.0, abs=1e-8)


def test_non_commuting_covariances_match_the_2x2_closed_form() -> None:
    """For 2x2 SPD A and B the eigenvalues l1, l2 of AB are real and positive, so
    Tr (AB)^{1/2} = sqrt(l1) + sqrt(l2) = sqrt(tr AB + 2 sqrt(det A det B)). Here tr AB = 50 and
    det A det B = 81, so FD = ||mu1 - mu2||^2 + tr A + tr B - 2 sqrt(68) = 5 + 20 - 4 sqrt(17).
    A and B do not commute, so a formula using Tr(A^{1/2} B^{1/2}) (= 8 here) gives 9 and fails."""
    a_cov, b_cov = np.array([[1.0, 0.0], [0.0, 9.0]]), np.array([[5.0, 4.0], [4.0, 5.0]])
    assert not np.allclose(a_cov @ b_cov, b_cov @ a_cov)
    a = FeatureStats(np.array([0.0, 1.0]), a_cov, 10)
    b = FeatureStats(np.array([1.0, -1.0]), b_cov, 10)
    expected = 25.0 - 4.0 * np.sqrt(17.0)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=0)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9, abs=0)


def test_full_covariances_match_an_independent_implementation() -> None:
    """torchmetrics' FID formula (Tr (S1 S2)^{1/2} as the sum of the square roots of the
    eigenvalues of S1 S2, ``torch.linalg.eigvals``, not ``scipy.linalg.sqrtm``) on the statistics
    of 200 correlated 64-dimensional features, in float64: equal to 1e-9 relative."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64))
    y = rng.normal(size=(200, 64)) @ rng.normal(size=(64, 64)) + 0.3
    a, b = feature_stats(x), feature_stats(y)
    expected = float(torchmetrics_fid(*(torch.from_numpy(v) for v in (a.mu, a.sigma, b.mu, b.sigma))))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=0)


def test_sampled_gaussians_approach_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    mu1, var1 = np.array([0.0, 2.0, 1.0, -1.0]), np.array([1.0, 2.0, 0.5, 3.0])
    mu2, var2 = np.array([0.5, 2.0, 0.0, -1.0]), np.array([2.0, 0.5, 0.5, 1.0])
    n = 200_000
    x = mu1 + rng.normal(size=(n, 4)) * np.sqrt(var1)
    y = mu2 + rng.normal(size=(n, 4)) * np.sqrt(var2)
    expected = _analytic_diag(mu1, var1, mu2, var2)
    assert frechet_distance(feature_stats(x), feature_stats(y)) == pytest.approx(expected, abs=0.03)


def test_identity_symmetry_and_small_n() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 6)), rng.normal(loc=0.3, size=(60, 6))
    sx, sy = feature_stats(x), feature_stats(y)
    assert frechet_distance(sx, sx) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(sx, sy) == pytest.approx(frechet_distance(sy, sx), rel=1e-8)
    assert frechet_distance(sx, sy) > 0
    # N < D: singular covariances still give a finite, non-negative number (the eps fallback)
    small = feature_stats(rng.normal(size=(4, 16)))
    other = feature_stats(rng.normal(size=(5, 16)))
    value = frechet_distance(small, other)
    assert np.isfinite(value) and value > -1e-6
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(x[:1])
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(sx, feature_stats(rng.normal(size=(10, 3))))


def test_cache_round_trip_and_key(tmp_path: Path) -> None:
    cache = StatsCache(tmp_path / "cache")
    manifest = {"source_checksum": "sha256:abc", "options": {"val_fraction": 0.2}, "counts": {"train": 66},
                "image_shape": [1, 28, 28]}
    key = stats_key(manifest, "train", 0, 50, "classifier:sha256:1")
    assert cache.load(key) is None  # miss
    stats = feature_stats(np.random.default_rng(3).normal(size=(20, 5)))
    cache.save(key, stats, {"what": "test"})
    hit = cache.load(key)
    assert hit is not None and hit.n == stats.n
    assert np.array_equal(hit.mu, stats.mu) and np.array_equal(hit.sigma, stats.sigma)
    assert hit.mu.dtype == np.float64 and hit.sigma.shape == (5, 5)
    variants = [stats_key({**manifest, "source_checksum": "sha256:other"}, "train", 0, 50, "classifier:sha256:1"),
                stats_key({**manifest, "options": {"val_fraction": 0.1}}, "train", 0, 50, "classifier:sha256:1"),
                stats_key(manifest, "val", 0, 50, "classifier:sha256:1"),
                stats_key(manifest, "train", 0, 49, "classifier:sha256:1"),
                stats_key(manifest, "train", 1, 50, "classifier:sha256:1"),
                stats_key(manifest, "train", 0, 50, "classifier:sha256:2")]
    assert len({key, *variants}) == len(variants) + 1


def test_seeded_blocks_do_not_depend_on_the_split(tmp_path: Path) -> None:
    """The blocks of ``sample_blocks``, in any grouping, are ``sample_locally``'s images, on a
    network whose output depends on its input (``computing_unet``: with a zero-output UNet, DDIM's
    images do not depend on the network or the number of steps)."""
    diffusion = DiffusionConfig(num_timesteps=50)
    folder = save_checkpoint(tmp_path / "ckpt", computing_unet(TINY_UNET, seed=0).state_dict(), TINY_UNET, diffusion)
    settings = SamplerSettings("ddim", 3)
    whole = sample_locally(folder, settings, num_images=7, block_size=3, seed=5)
    zero = save_checkpoint(tmp_path / "zero", UNet(TINY_UNET).state_dict(), TINY_UNET, diffusion)
    assert np.abs(sample_locally(zero, settings, 7, 3, seed=5) - whole).max() > 1e-3
    assert whole.shape == (7, 1, 8, 8) and whole.dtype == np.float32 and np.isfinite(whole).all()
    loaded = load_checkpoint(folder)
    parts = [sample_blocks(loaded.diffusion, loaded.model, (1, 8, 8), settings, 7, 3, 5, np.array(b))
             for b in ([2], [0, 1])]
    index = np.concatenate([p["index"] for p in parts])
    images = np.concatenate([p["image"] for p in parts])[np.argsort(index)]
    assert np.array_equal(np.sort(index), np.arange(7))
    assert np.array_equal(images, whole)
    assert not np.array_equal(sample_locally(folder, settings, 7, 3, seed=6), whole)
    assert len({block_seed(0, 0), block_seed(0, 1), block_seed(1, 0)}) == 3


def test_inception_without_weights_says_which_file_and_where(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / INCEPTION_FILE
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt") as info:
        InceptionFeatures(str(missing))
    assert str(missing) in str(info.value) and "--inception-weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no --inception-weights was given"):
        build_feature_net("inception")
    with pytest.raises(ValueError, match="--fd-classifier"):
        build_feature_net("classifier")


@pytest.mark.parametrize("argv, message", [
    (["--fd", "1", "--fd-classifier", "x"], "--fd=1 must be >= 2"),
    (["--fd", "16"], "needs --fd-classifier"),
    (["--fd-classifier", "x"], "need --fd N"),
    (["--fd", "-3"], "must be >= 0"),
    (["--fd", "4", "--fd-classifier", "x", "--fd-workers", "0"], "--fd-workers"),
    (["--fd", "4", "--fd-features", "vgg"], "invalid choice"),
])
def test_bad_fd_flags(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(["--model", "m", "--shards", "s", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
