"""The Inception FD features (``evaluation.features.InceptionFeatures``) on a stand-in TorchScript
module of the same interface as ``inception-2015-12-05.pt`` (``_inception_standin``). The stand-in
reports what it was given, so the tests check the scaling from [-1, 1] to [0, 255], the grey-to-RGB repeat, the shape handed to the network
and the reshape of its output to float64 ``[N, 2048]`` (fast: no Ray, no MLflow)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from _inception_standin import save_stand_in

from pipelines.evaluation.fd import features_in_batches
from pipelines.evaluation.features import InceptionFeatures, build_feature_net

DIM = 2048


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_stand_in(tmp_path_factory.mktemp("inception") / "stand-in.pt", DIM)


def _read(features: np.ndarray, channels: int = 3) -> dict[str, np.ndarray]:
    """The stand-in's report, split into its fields."""
    per_channel = features[:, : 3 * channels].reshape(len(features), channels, 3)
    shape = features[:, 3 * channels : 3 * channels + 5]
    return {"min": per_channel[..., 0], "max": per_channel[..., 1], "mean": per_channel[..., 2], "shape": shape}


def test_grey_images_reach_the_network_as_rgb_in_0_255(weights: Path) -> None:
    net = build_feature_net("inception", inception_weights=str(weights))
    assert isinstance(net, InceptionFeatures) and net.dim == DIM
    images = np.zeros((3, 1, 8, 6), np.float32)
    images[0] = -1.0  # black
    images[1, 0, :4] = 1.0  # half white, half mid-grey 0.0
    images[2, 0, 0, 0], images[2, 0, 0, 1] = 1.5, -2.0  # beyond the range: clamped to 255 and 0
    features = net.features(images)
    assert features.shape == (3, DIM) and features.dtype == np.float64
    report = _read(features)
    np.testing.assert_array_equal(report["shape"], np.tile([3, 8, 6, 299, 299], (3, 1)))
    np.testing.assert_allclose(report["min"], [[0, 0, 0], [127.5] * 3, [0, 0, 0]])
    np.testing.assert_allclose(report["max"], [[0, 0, 0], [255] * 3, [255] * 3])
    expected_mean = [0.0, (255 + 127.5) / 2, (255 + 0 + 46 * 127.5) / 48]
    np.testing.assert_allclose(report["mean"], np.repeat(np.array(expected_mean)[:, None], 3, axis=1), rtol=1e-6)


def test_rgb_channels_stay_apart_and_batches_concatenate(weights: Path) -> None:
    net = InceptionFeatures(str(weights))
    images = np.stack([np.stack([np.full((5, 5), v, np.float32) for v in (-1.0, 0.0, 1.0)])] * 5)
    images[3] = -images[3]
    whole = net.features(images)
    report = _read(whole)
    np.testing.assert_allclose(report["mean"][0], [0.0, 127.5, 255.0])
    np.testing.assert_allclose(report["mean"][3], [255.0, 127.5, 0.0])
    np.testing.assert_array_equal(features_in_batches(net, images, batch_size=2), whole)


def test_identity_is_the_file_digest_and_bad_inputs_fail(weights: Path, tmp_path: Path) -> None:
    net = InceptionFeatures(str(weights))
    assert net.identity == f"inception:sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()}"
    with pytest.raises(ValueError, match="Inception takes 1 or 3 channels, got 2"):
        net.features(np.zeros((1, 2, 4, 4), np.float32))
    not_torchscript = tmp_path / "inception-2015-12-05.pt"
    not_torchscript.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ValueError, match="is not a TorchScript Inception"):
        InceptionFeatures(str(not_torchscript))
