"""The FD end to end on the session's tiny Fashion-MNIST shards: the classifier trained for one
epoch and registered in MLflow, the Ray sampler against one process, and evaluate.py --fd on an
untrained tiny DDPM (numbers finite, floor logged, the cache used the second time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _unet_helpers import computing_unet
from mlflow import MlflowClient

from diffusion_core.checkpoint import save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.generate import SamplerSettings
from diffusion_core.unet import UNet
from pipelines.data.shards.reader import read_split_numpy
from pipelines.evaluate import main as evaluate_main
from pipelines.evaluation.classifier import ClassifierFeatures, accuracy, load_classifier
from pipelines.evaluation.distributed_sampling import sample_distributed, sample_locally
from pipelines.evaluation.fd import RealSlice, StatsCache, slice_stats
from pipelines.registry.feature_store import fetch_feature_net
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.train_classifier import main as train_classifier_main

pytestmark = pytest.mark.slow
UNET_28 = UNetConfig(image_size=28, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_heads=1)
UNET_8 = UNetConfig(image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=4, num_heads=1)
REGISTERED = "fd-classifier-test"


@pytest.fixture(scope="module")
def classifier(fmnist_shards: Path, train_sandbox: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    output = tmp_path_factory.mktemp("fd") / "classifier"
    return {"folder": output, "argv": ["--shards", str(fmnist_shards), "--epochs", "1", "--output", str(output),
                                       "--registered-name", REGISTERED, "--threads", "1"]}


@pytest.fixture(scope="module")
def ddpm_28(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ddpm") / "ckpt", UNet(UNET_28).state_dict(), UNET_28,
                           DiffusionConfig(num_timesteps=50))


def test_train_classifier_prints_accuracy_and_registers(classifier: dict, fmnist_shards: Path, capsys) -> None:
    assert train_classifier_main(classifier["argv"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out and str(classifier["folder"]) in out
    client = MlflowClient(resolve_tracking_uri())
    version = client.search_model_versions(f"name='{REGISTERED}'")[0]
    run = client.get_run(version.run_id)
    assert run.data.params["epochs"] == "1"
    fetched = fetch_feature_net(f"models:/{REGISTERED}/{version.version}")
    assert (fetched / "model.safetensors").read_bytes() == (classifier["folder"] / "model.safetensors").read_bytes()
    model, metadata = load_classifier(fetched)
    assert model.config.feature_dim == 128 and metadata["weights_sha256"].startswith("sha256:")
    # the logged and printed accuracy is the registered model's on the val split (one epoch on 66
    # images is near chance: that the classifier learns is test_fd_classifier.py's check)
    val_images, val_labels = read_split_numpy(str(fmnist_shards), "val")
    labelled = val_labels >= 0
    assert labelled.sum() == 14
    recomputed = accuracy(model, val_images[labelled], val_labels[labelled])
    assert run.data.metrics["val_accuracy"] == pytest.approx(recomputed, abs=1e-12)
    assert f"held-out accuracy: {recomputed:.4f}" in out


def test_reference_stats_are_cached(classifier: dict, fmnist_shards: Path, tmp_path: Path) -> None:
    if not (classifier["folder"] / "model.safetensors").is_file():
        assert train_classifier_main([*classifier["argv"], "--no-mlflow"]) == 0
    net = ClassifierFeatures(load_classifier(classifier["folder"])[0])
    computed = []
    cache = StatsCache(tmp_path / "cache")
    real = RealSlice(str(fmnist_shards), "train", 0, 40)
    first, hit1 = slice_stats(real, net, cache, on_compute=computed.append)
    second, hit2 = slice_stats(real, net, cache, on_compute=computed.append)
    assert (hit1, hit2, len(computed)) == (False, True, 1)
    assert first.mu.shape == (128,) and first.sigma.shape == (128, 128) and first.n == 40
    assert np.array_equal(first.mu, second.mu) and np.array_equal(first.sigma, second.sigma)
    with pytest.raises(ValueError, match="has 14 images"):
        slice_stats(RealSlice(str(fmnist_shards), "val", 0, 16), net, cache)


def test_ray_sampler_matches_one_process(ray_local, tmp_path: Path) -> None:
    """Ray actors draw, bit for bit, the images of one process, on ``computing_unet`` weights (with
    a zero-output UNet, DDIM's images depend on neither the weights nor the number of steps)."""
    diffusion = DiffusionConfig(num_timesteps=50)
    folder = save_checkpoint(tmp_path / "ckpt", computing_unet(UNET_8, seed=1).state_dict(), UNET_8, diffusion)
    settings = SamplerSettings("ddim", 3)
    expected = sample_locally(folder, settings, num_images=10, block_size=4, seed=7)
    zero = save_checkpoint(tmp_path / "zero", UNet(UNET_8).state_dict(), UNET_8, diffusion)
    assert np.abs(sample_locally(zero, settings, 10, 4, seed=7) - expected).max() > 1e-3
    one_by_one = sample_distributed(folder, settings, 10, block_size=4, seed=7, workers=2, blocks_per_batch=1)
    together = sample_distributed(folder, settings, 10, block_size=4, seed=7, workers=1, blocks_per_batch=3)
    assert one_by_one.shape == (10, 1, 8, 8)
    np.testing.assert_array_equal(one_by_one, expected)
    np.testing.assert_array_equal(together, expected)


def test_evaluate_fd_logs_fd_and_floor_and_reuses_the_cache(
    classifier: dict, ddpm_28: Path, fmnist_shards: Path, train_sandbox: Path, tmp_path: Path, capsys,
) -> None:
    if not (classifier["folder"] / "model.safetensors").is_file():
        assert train_classifier_main([*classifier["argv"], "--no-mlflow"]) == 0
    argv = ["--model", str(ddpm_28), "--shards", str(fmnist_shards), "--images", "1", "--estimate", "2",
            "--samples", "0", "--sample-steps", "3", "--threads", "1", "--experiment", "fd-test",
            "--fd", "16", "--fd-classifier", str(classifier["folder"]), "--fd-floor-split", "train",
            "--fd-cache", str(tmp_path / "cache"), "--fd-block", "8", "--no-compile"]
    assert evaluate_main(argv) == 0
    printed = capsys.readouterr().out
    assert '"fd"' in printed and '"fd_floor"' in printed
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name("fd-test")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    first = runs[-1]
    metrics, params = first.data.metrics, first.data.params
    assert np.isfinite(metrics["fd"]) and np.isfinite(metrics["fd_floor"]) and metrics["fd_floor"] >= 0
    assert metrics["fd"] > metrics["fd_floor"]  # an untrained model is farther from the data than real images
    assert (params["fd_images"], params["fd_features"], params["fd_floor_split"]) == ("16", "classifier", "train")
    assert (params["fd_reference_images"], params["fd_floor_start"]) == ("50", "50")  # 66 = 50 reference + 16 floor
    assert first.data.tags["fd.reference_cache_hit"] == "false"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # reference + floor

    assert evaluate_main(argv) == 0
    capsys.readouterr()
    second = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    assert second.info.run_id != first.info.run_id
    assert second.data.tags["fd.reference_cache_hit"] == "true"
    assert second.data.metrics["fd"] == first.data.metrics["fd"]  # same seed, same samples, same cached stats
    assert second.data.metrics["fd_floor"] == first.data.metrics["fd_floor"]

    # the floor's split (val: 14 images) is too small for N = 16: a clear error, exit code 2
    bad = [a for a in argv if a not in ("--fd-floor-split", "train")]
    assert evaluate_main(bad) == 2
    assert "split 'val'" in capsys.readouterr().err
