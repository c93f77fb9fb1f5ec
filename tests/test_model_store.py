"""pipelines.registry.model_store against a real SQLite-backed MLflow: log, register, fetch back, load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from _unet_helpers import computing_unet
from mlflow import MlflowClient

from diffusion_core.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.generate import SamplerSettings, generate, seeded_generator
from diffusion_core.unet import UNet
from pipelines.registry.model_store import ModelRef, fetch_checkpoint, log_checkpoint_model
from pipelines.registry.pyfunc_model import DDPMCheckpointModel, PyfuncSampleRequest
from pipelines.registry.tracking_uri import ensure_experiment, mlflow_store
from tooling.s3_server import running_s3_server

TINY_UNET = UNetConfig(
    image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
    num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=4, num_heads=1,
)
TINY_DIFFUSION = DiffusionConfig(num_timesteps=50)
MANIFEST = {"schema_version": 1, "source_checksum": "sha256:abc123", "counts": {"train": 9, "val": 1}}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds), made the
    process-wide default meanwhile; each test registers under its own model name."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with mlflow_store(uri):
        yield uri


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """``computing_unet(TINY_UNET, seed=0)``'s weights: the pyfunc is compared with ``generate`` on them."""
    model = computing_unet(TINY_UNET, seed=0)
    return save_checkpoint(tmp_path / "ckpt", model.state_dict(), TINY_UNET, TINY_DIFFUSION, {"step": 7})


def _log(checkpoint: Path, tracking: str, **kwargs) -> ModelRef:
    experiment_id = ensure_experiment(MlflowClient(tracking), "model-store-test", tracking)
    with mlflow.start_run(experiment_id=experiment_id):
        return log_checkpoint_model(checkpoint, **kwargs)


def _same_weights(a: Path, b: Path) -> bool:
    return (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_registered_model_round_trip(tracking: str, checkpoint: Path, tmp_path: Path) -> None:
    ref = _log(checkpoint, tracking, registered_model_name="ddpm-test", manifest=MANIFEST)
    assert ref.model_uri == "models:/ddpm-test/1" and ref.name == "ddpm-test" and ref.version == "1"

    folder = fetch_checkpoint(ref.model_uri, str(tmp_path / "dl"))
    assert folder.is_absolute() and folder.is_relative_to(tmp_path / "dl")
    assert _same_weights(folder, checkpoint)
    assert json.loads((folder / "manifest.json").read_text()) == MANIFEST
    loaded = load_checkpoint(folder)
    assert loaded.metadata == {"step": 7} and loaded.unet_config == TINY_UNET
    reference = computing_unet(TINY_UNET, seed=0)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)

    client = MlflowClient(tracking)
    version = client.get_model_version("ddpm-test", "1")
    assert version.run_id == ref.run_id
    assert version.tags["data_manifest_checksum"] == "sha256:abc123"
    client.set_registered_model_alias("ddpm-test", "champion", "1")
    by_alias = fetch_checkpoint("models:/ddpm-test@champion", str(tmp_path / "alias"))
    assert _same_weights(by_alias, checkpoint)
    by_run = fetch_checkpoint(f"runs:/{ref.run_id}/model")
    assert _same_weights(by_run, checkpoint)


def test_second_version_and_unregistered(tracking: str, checkpoint: Path, tmp_path: Path) -> None:
    _log(checkpoint, tracking, registered_model_name="ddpm-second")
    second = save_checkpoint(tmp_path / "ckpt2", UNet(TINY_UNET).state_dict(), TINY_UNET, TINY_DIFFUSION, {"step": 9})
    ref2 = _log(second, tracking, registered_model_name="ddpm-second")
    assert ref2.version == "2"
    assert load_checkpoint(fetch_checkpoint("models:/ddpm-second/2")).metadata == {"step": 9}
    assert load_checkpoint(fetch_checkpoint("models:/ddpm-second/1")).metadata == {"step": 7}
    plain = _log(checkpoint, tracking)
    assert plain.name is None and plain.version is None and plain.model_uri == f"runs:/{plain.run_id}/model"
    assert not (fetch_checkpoint(plain.model_uri) / "manifest.json").exists()


def test_pyfunc_model_samples_like_the_core_sampler(tracking: str, checkpoint: Path) -> None:
    """``mlflow.pyfunc.load_model`` of a registered model: ``predict`` takes a list of requests,
    validated by MLflow against the typed signature, and runs seeded DDIM on the logged weights."""
    ref = _log(checkpoint, tracking, registered_model_name="ddpm-pyfunc")
    pyfunc = mlflow.pyfunc.load_model(ref.model_uri)
    assert pyfunc.metadata.signature is not None  # inferred from predict's type hints
    request = {"num_images": 3, "seed": 5, "num_steps": 4}

    (images,) = pyfunc.predict([request])
    images = np.asarray(images, dtype=np.float32)
    assert images.shape == (3, 1, 8, 8)
    assert np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0  # not a constant image
    again, other = pyfunc.predict([request, {**request, "seed": 6}])
    np.testing.assert_array_equal(np.asarray(again, dtype=np.float32), images)  # same seed, same images
    assert not np.array_equal(np.asarray(other, dtype=np.float32), images)

    loaded = load_checkpoint(checkpoint)
    expected = generate(loaded.diffusion, loaded.model, (3, 1, 8, 8), SamplerSettings("ddim", 4),
                        generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(images, expected.numpy(), rtol=0, atol=1e-6)
    zero_output = generate(loaded.diffusion, UNet(TINY_UNET).eval(), (3, 1, 8, 8), SamplerSettings("ddim", 4),
                           generator=torch.Generator().manual_seed(5))
    assert np.abs(images - zero_output.numpy()).max() > 1e-3  # the logged weights computed these images
    fewer_steps = generate(loaded.diffusion, loaded.model, (3, 1, 8, 8), SamplerSettings("ddim", 3),
                           generator=torch.Generator().manual_seed(5))
    assert np.abs(images - fewer_steps.numpy()).max() > 1e-3  # num_steps reached the sampler

    for bad in (0, -1, 257):  # refused by MLflow's validation against PyfuncSampleRequest
        with pytest.raises(mlflow.exceptions.MlflowException, match="num_images"):
            pyfunc.predict([{**request, "num_images": bad}])


def test_local_folder(checkpoint: Path, tmp_path: Path) -> None:
    assert fetch_checkpoint(str(checkpoint)) == checkpoint.resolve()
    assert fetch_checkpoint(str(tmp_path)) == checkpoint.resolve()  # found one level down
    copied = fetch_checkpoint(str(checkpoint), str(tmp_path / "copy"))
    assert copied != checkpoint.resolve() and _same_weights(copied, checkpoint)


def test_bad_inputs(tracking: str, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        fetch_checkpoint("")
    with pytest.raises(ValueError, match="unsupported model uri 'ftp://x/y'"):
        fetch_checkpoint("ftp://x/y")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no folder with model.safetensors"):
        fetch_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="models:/never-registered/1"):
        fetch_checkpoint("models:/never-registered/1", str(tmp_path / "dl"))
    with pytest.raises(FileNotFoundError, match="ddpm-test"):
        fetch_checkpoint("models:/ddpm-test/99", str(tmp_path / "dl"))
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_checkpoint_model(checkpoint)
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        _log(checkpoint, tracking)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        _log(tmp_path / "empty", tracking)


def test_s3_prefix(checkpoint: Path, tmp_path: Path) -> None:
    with running_s3_server(set_environ=True) as s3:
        s3.create_bucket("models")
        uri = s3.upload_folder(checkpoint, "models", "ddpm/v1")
        folder = fetch_checkpoint(uri, str(tmp_path / "from-s3"))
    assert folder.is_relative_to(tmp_path / "from-s3") and _same_weights(folder, checkpoint)
    assert load_checkpoint(folder).metadata == {"step": 7}


def test_pyfunc_predict_takes_any_sampler() -> None:
    """DDPMCheckpointModel.predict (without MLflow): a list of typed requests, each answered with its
    images as nested lists; the default is DDIM with 50 steps, and the sampler fields select any
    ``generate`` sampler; bad settings raise ValueError naming the field. On ``computing_unet``, so
    that a request whose order, snr or step count were dropped would draw other images."""
    model = computing_unet(TINY_UNET, seed=0)
    wrapper = DDPMCheckpointModel()
    wrapper.loaded = LoadedModel(model, GaussianDiffusion(TINY_DIFFUSION), TINY_UNET, TINY_DIFFUSION, {})

    def expected(settings: SamplerSettings, n: int, seed: int):
        return generate(wrapper.loaded.diffusion, model, (n, 1, 8, 8), settings, seeded_generator(seed)).numpy()

    requests = [PyfuncSampleRequest(num_images=2, seed=3),
                PyfuncSampleRequest(num_images=1, seed=4, sampler="dpm_solver", num_steps=5, order=1),
                PyfuncSampleRequest(num_images=1, seed=5, sampler="pc", num_steps=4, snr=0.1)]
    out = [np.asarray(images, dtype=np.float32) for images in wrapper.predict(None, requests)]
    np.testing.assert_array_equal(out[0], expected(SamplerSettings("ddim", 50), 2, 3))
    np.testing.assert_array_equal(out[1], expected(SamplerSettings("dpm_solver", 5, order=1), 1, 4))
    np.testing.assert_array_equal(out[2], expected(SamplerSettings("pc", 4, snr=0.1), 1, 5))
    for got, other in ((out[1], SamplerSettings("dpm_solver", 5, order=2)), (out[2], SamplerSettings("pc", 4, snr=0.2)),
                       (out[2], SamplerSettings("pc", 3, snr=0.1))):
        assert np.abs(got - expected(other, 1, 4 if other.sampler == "dpm_solver" else 5)).max() > 1e-3
    with pytest.raises(ValueError, match="snr=0"):
        wrapper.predict(None, [PyfuncSampleRequest(sampler="pc", snr=0)])


COND_UNET = UNetConfig(
    image_size=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2),
    num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, num_groups=4, num_heads=1, num_classes=3,
)
CLASSES = ["Top", "Sandal", "Bag"]


def test_pyfunc_of_a_conditional_model_takes_class_label_and_guidance_scale(tracking: str, tmp_path: Path) -> None:
    """A class-conditional model logged with its data manifest (``classes``): the loaded pyfunc resolves
    class names from it and samples like ``generate`` with those labels and that guidance scale;
    MLflow refuses a bad scale, ``predict`` a bad label, naming the field."""
    model = computing_unet(COND_UNET, seed=0)
    folder = save_checkpoint(tmp_path / "cond", model.state_dict(), COND_UNET, TINY_DIFFUSION, {"step": 1})
    ref = _log(folder, tracking, registered_model_name="ddpm-pyfunc-cond", manifest={**MANIFEST, "classes": CLASSES})
    pyfunc = mlflow.pyfunc.load_model(ref.model_uri)
    request = {"num_images": 2, "seed": 5, "num_steps": 4, "class_label": "Sandal", "guidance_scale": 2.0}
    named, listed, limited = pyfunc.predict([request, {**request, "class_label": [1, None]},
                                             {**request, "guidance_interval": [0.5, None]}])
    diffusion = GaussianDiffusion(TINY_DIFFUSION)

    def expected(labels: list[int], scale: float, interval: tuple[float, float] | None = None) -> np.ndarray:
        return generate(diffusion, model, (2, 1, 8, 8), SamplerSettings("ddim", 4), seeded_generator(5),
                        class_labels=labels, guidance_scale=scale, guidance_interval=interval).numpy()

    np.testing.assert_allclose(np.asarray(named, dtype=np.float32), expected([1, 1], 2.0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(listed, dtype=np.float32), expected([1, -1], 2.0), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(named, dtype=np.float32) - expected([1, 1], 1.0)).max() > 1e-3  # the scale acts
    assert np.abs(np.asarray(named, dtype=np.float32) - expected([2, 2], 2.0)).max() > 1e-3  # the label acts
    guided_in = expected([1, 1], 2.0, (0.5, math.inf))
    np.testing.assert_allclose(np.asarray(limited, dtype=np.float32), guided_in, rtol=0, atol=1e-6)
    assert np.abs(np.asarray(named, dtype=np.float32) - guided_in).max() > 1e-3  # the interval acts
    for bad in ([2, 1], [0.5], "0.5"):
        with pytest.raises(mlflow.exceptions.MlflowException, match="guidance_interval"):
            pyfunc.predict([{**request, "guidance_interval": bad}])
    for bad in (-1.0, float("nan")):
        with pytest.raises(mlflow.exceptions.MlflowException, match="guidance_scale"):
            pyfunc.predict([{**request, "guidance_scale": bad}])
    for label, message in (("Sneaker", "not a class of this model"), (3, "out of range"), ([1], "1 labels for 2")):
        with pytest.raises(ValueError, match=f"class_label.*{message}"):
            pyfunc.predict([{**request, "class_label": label}])


def test_pyfunc_predict_refuses_labels_and_guidance_for_an_unconditional_model() -> None:
    wrapper = DDPMCheckpointModel()
    wrapper.loaded = LoadedModel(computing_unet(TINY_UNET, seed=0), GaussianDiffusion(TINY_DIFFUSION), TINY_UNET,
                                 TINY_DIFFUSION, {})
    with pytest.raises(ValueError, match="class_label: this model is unconditional"):
        wrapper.predict(None, [PyfuncSampleRequest(num_images=1, num_steps=2, class_label=0)])
    with pytest.raises(ValueError, match="guidance_scale: 3.0 asks for classifier-free guidance"):
        wrapper.predict(None, [PyfuncSampleRequest(num_images=1, num_steps=2, guidance_scale=3)])
    with pytest.raises(ValueError, match="guidance_interval: this model is unconditional"):
        wrapper.predict(None, [PyfuncSampleRequest(num_images=1, num_steps=2, guidance_interval=[0.5, 2])])
    (images,) = wrapper.predict(None, [PyfuncSampleRequest(num_images=1, num_steps=2, guidance_scale=1)])
    assert np.asarray(images).shape == (1, 1, 8, 8)
