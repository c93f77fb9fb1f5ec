"""The UNet of Ho et al. 2020: parameter counts, shapes, input checks, time conditioning, gradients."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from _unet_helpers import SMALL_UNET

from diffusion_core.config import UNetConfig
from diffusion_core.nn import timestep_embedding
from diffusion_core.unet import UNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SMALL = SMALL_UNET


def _model_config(name: str) -> UNetConfig:
    return UNetConfig.from_dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (zero-initialised ones included) non-zero random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_cifar10_config_has_the_official_parameter_count():
    with torch.device("meta"):
        model = UNet(_model_config("cifar10_ddpm"))
    count = _num_params(model)
    assert abs(count - 35.7e6) / 35.7e6 < 0.005
    assert count == 35_746_307  # the official diffusion_tf CIFAR-10 model


def test_tiny_config_is_well_under_a_million_parameters():
    count = _num_params(UNet(_model_config("tiny_cpu")))
    assert 10_000 < count < 500_000


@pytest.mark.parametrize("in_ch,out_ch", [(1, 1), (3, 3), (1, 2), (3, 6)])
def test_output_shape(in_ch, out_ch):
    cfg = dataclasses.replace(SMALL, in_channels=in_ch, out_channels=out_ch)
    model = UNet(cfg).eval()
    assert model.config is cfg
    out = model(torch.randn(2, in_ch, 8, 8), torch.tensor([0, 7]))
    assert out.shape == (2, out_ch, 8, 8)
    assert out.dtype == torch.float32


def test_fashion_mnist_odd_feature_map_shapes():
    cfg = _model_config("fashion_mnist")  # 28 -> 14 -> 7, attention at 7
    out = UNet(cfg).eval()(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 3, 16, 16), r"\(2, 3, 16, 16\).*\[N, 3, 8, 8\]"),
        ((2, 1, 8, 8), r"\(2, 1, 8, 8\)"),
        ((3, 8, 8), r"\(3, 8, 8\)"),
    ],
)
def test_wrong_input_shape_raises_value_error(shape, match):
    with pytest.raises(ValueError, match=match):
        UNet(SMALL)(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))


def test_wrong_timestep_shape_raises_value_error():
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        UNet(SMALL)(torch.randn(2, 3, 8, 8), torch.zeros(3, dtype=torch.long))


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet(SMALL.to_dict())  # type: ignore[arg-type]


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)  # 10000^(-i/(half-1))
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert torch.allclose(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]), atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(torch.tensor([1]), 7)


def test_time_embedding_changes_the_output():
    model = UNet(SMALL).eval()
    _randomize_(model)
    x = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([1, 500]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_gradient_reaches_every_parameter():
    model = UNet(SMALL).train()
    _randomize_(model)
    loss = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 9])).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_zero_initialised_output():
    out = UNet(SMALL)(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))  # conv_out starts at zero (Ho et al. init_scale=0)


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = UNet(SMALL)
    _randomize_(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([4, 4])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    torch.manual_seed(0)
    first = model(x, t)
    assert not torch.equal(first, model(x, t))


def test_channels_last_matches_contiguous():
    model = UNet(SMALL).eval()
    _randomize_(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([2, 5])
    reference = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(out, reference, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_and_is_close():
    model = UNet(SMALL).eval()
    _randomize_(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([2, 5])
    reference = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.shape == reference.shape
    assert torch.isfinite(out.float()).all()
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.1


# ------------------------------------------------------------------ class-conditional UNet

COND = dataclasses.replace(SMALL, num_classes=3)


def test_unconditional_model_has_no_label_parameters_and_the_same_state_dict_keys():
    unconditional = UNet(SMALL)
    assert not hasattr(unconditional, "label_emb")
    keys = set(unconditional.state_dict())
    conditional = UNet(COND)
    assert set(conditional.state_dict()) - keys == {"label_emb.weight"}
    emb_ch = 4 * SMALL.model_channels
    assert conditional.label_emb.weight.shape == (COND.num_classes + 1, emb_ch)  # row K = "no label"
    assert _num_params(conditional) - _num_params(unconditional) == (COND.num_classes + 1) * emb_ch


def test_class_labels_change_the_output_and_none_means_no_label():
    model = UNet(COND).eval()
    _randomize_(model)
    x = torch.randn(1, 3, 8, 8).expand(5, -1, -1, -1)
    t = torch.full((5,), 7)
    out = model(x, t, torch.tensor([0, 1, 2, -1, 0]))
    for a, b in ((0, 1), (1, 2), (0, 3)):
        assert (out[a] - out[b]).abs().max() > 1e-3
    torch.testing.assert_close(out[0], out[4])
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((5,), -1)))
    # -1 selects row K of the embedding, "no label"
    assert torch.equal(model._label_embedding(torch.tensor([-1, 1]), t[:2]), model.label_emb.weight[[3, 1]])


def test_gradient_reaches_the_label_embedding():
    model = UNet(COND).train()
    _randomize_(model)
    model(torch.randn(3, 3, 8, 8), torch.tensor([3, 9, 1]), torch.tensor([0, -1, 2])).square().mean().backward()
    grad = model.label_emb.weight.grad
    assert grad is not None
    assert [bool(grad[i].abs().sum() > 0) for i in range(4)] == [True, False, True, True]


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([0, 3]), r"class_labels has the value 3; labels must be in \[-1, 3\)"),
    (torch.tensor([-2, 0]), r"class_labels has the value -2; labels must be in \[-1, 3\)"),
    (torch.tensor([0, 1, 2]), r"class_labels must have shape \[N\] = \[2\]"),
    (torch.tensor([0.0, 1.0]), "class_labels must be an integer"),
])
def test_bad_class_labels_raise_naming_the_range(labels, match):
    with pytest.raises(ValueError, match=match):
        UNet(COND)(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), labels)


def test_labels_on_an_unconditional_model_raise():
    with pytest.raises(ValueError, match="this model is unconditional"):
        UNet(SMALL)(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([0, 1]))


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "10"])
def test_num_classes_must_be_a_positive_int_or_none(value):
    with pytest.raises(ValueError, match="num_classes"):
        dataclasses.replace(SMALL, num_classes=value)


def test_num_classes_round_trips_and_unconditional_dicts_have_no_such_key():
    assert "num_classes" not in SMALL.to_dict()  # config.json and logged params of unconditional models unchanged
    assert UNetConfig.from_dict(SMALL.to_dict()) == SMALL and not SMALL.conditional
    data = COND.to_dict()
    assert data["num_classes"] == 3 and COND.conditional
    assert UNetConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == COND


def test_conditional_checkpoint_round_trip_and_unconditional_config_json_unchanged(tmp_path):
    import json

    from diffusion_core.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
    from diffusion_core.config import DiffusionConfig

    diffusion = DiffusionConfig(num_timesteps=50)
    model = UNet(COND).eval()
    _randomize_(model)
    folder = save_checkpoint(tmp_path / "cond", model.state_dict(), COND, diffusion)
    loaded = load_checkpoint(folder)
    assert loaded.unet_config == COND
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 40]), torch.tensor([2, -1])
    assert torch.equal(loaded.model(x, t, y), model(x, t, y))
    plain = save_checkpoint(tmp_path / "plain", UNet(SMALL).state_dict(), SMALL, diffusion)
    payload = json.loads((plain / CONFIG_NAME).read_text())
    assert "num_classes" not in payload["unet"]
    assert load_checkpoint(plain).model.config.num_classes is None
