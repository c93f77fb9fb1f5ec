"""Checkpoint folders (model.safetensors + config.json): round trips and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _unet_helpers import SMALL_UNET

from diffusion_core.checkpoint import LoadedModel, load_checkpoint, read_checkpoint_config, save_checkpoint
from diffusion_core.config import DiffusionConfig, UNetConfig
from diffusion_core.unet import UNet

UNET = dataclasses.replace(SMALL_UNET, in_channels=1, out_channels=2, num_heads=1)
DIFFUSION = DiffusionConfig(num_timesteps=50, schedule="cosine", variance="learned_range", loss="hybrid")


def _random_model(config: UNetConfig = UNET) -> UNet:
    model = UNet(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, UNet]:
    model = _random_model()
    folder = save_checkpoint(tmp_path / "ckpt", model.state_dict(), UNET, DIFFUSION, metadata={"step": 7, "run": "x"})
    return folder, model


def test_round_trip_gives_identical_outputs(saved):
    folder, model = saved
    loaded = load_checkpoint(str(folder))
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 10, 49])
    assert torch.equal(loaded.model(x, t), model(x, t))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_round_trip_keeps_configs_and_metadata(saved):
    folder, _ = saved
    loaded = load_checkpoint(folder)
    assert loaded.unet_config == UNET and loaded.model.config == UNET
    assert loaded.diffusion_config == DIFFUSION
    assert loaded.metadata == {"step": 7, "run": "x"}
    assert len(loaded.diffusion.betas) == DIFFUSION.num_timesteps
    assert read_checkpoint_config(folder) == (UNET, DIFFUSION, {"step": 7, "run": "x"})


def test_folder_layout_and_config_json(saved):
    folder, _ = saved
    assert folder.is_absolute()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    payload = json.loads((folder / "config.json").read_text())
    assert payload["format_version"] == 1
    assert payload["unet"]["channel_mult"] == [1, 2]
    assert payload["diffusion"]["variance"] == "learned_range"


def test_save_accepts_non_contiguous_tensors(tmp_path):
    model = _random_model()
    # Same values, transposed strides: the Linear weights become non-contiguous.
    state = {k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in model.state_dict().items()}
    assert any(not v.is_contiguous() for v in state.values())
    folder = save_checkpoint(tmp_path, state, UNET, DIFFUSION)
    assert torch.equal(load_checkpoint(folder).model.time_mlp[0].weight, model.time_mlp[0].weight)


def test_missing_folder_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope")
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_checkpoint_config(folder)


def test_corrupt_config_json(saved):
    folder, _ = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint config"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(format_version=2), "format_version=2"),
        (lambda c: c.pop("unet"), r"\['unet'\]"),
        (lambda c: c["unet"].update(num_groups=3), "num_groups=3"),
        (lambda c: c["diffusion"].update(variance="fixed_small"), "out_channels=2"),
    ],
)
def test_invalid_config_contents(saved, edit, match):
    folder, _ = saved
    payload = json.loads((folder / "config.json").read_text())
    edit(payload)
    (folder / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder)


def test_corrupt_weights_file(saved):
    folder, _ = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt weights file"):
        load_checkpoint(folder)


def test_weights_not_matching_config(saved):
    folder, _ = saved
    payload = json.loads((folder / "config.json").read_text())
    payload["unet"]["model_channels"] = 16
    (folder / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="do not match the UNet config.*shape"):
        load_checkpoint(folder)


def test_save_rejects_mismatched_weights_and_writes_nothing(tmp_path):
    state = _random_model().state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing key"):
        save_checkpoint(tmp_path / "a", prefixed, UNET, DIFFUSION)
    with pytest.raises(ValueError, match="out_channels"):
        save_checkpoint(tmp_path / "b", state, UNET, DiffusionConfig())
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(tmp_path / "c", state, UNET, DIFFUSION, metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []
