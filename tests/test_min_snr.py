"""Min-SNR-gamma loss weighting (Hang et al. 2023; ``diffusion.loss_weighting: min_snr``): the weight
against its closed form, the weighted losses of the four parameterizations against each other and
against min(SNR, gamma) times the x_0-MSE, "none" as the unweighted loss, the config checks and
round trips, the training config, the sweep spec, and a training step with importance-sampled
timesteps (both weights multiply)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    grid_images,
    linear_betas,
    single_thread,  # noqa: F401 (autouse fixture)
)
from _train_helpers import recording_backward
from _unet_helpers import SMALL_UNET

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.bound import mean_flat
from diffusion_core.checkpoint import CONFIG_NAME, FORMAT_VERSION, read_checkpoint_config, save_checkpoint
from diffusion_core.losses import min_snr_weight
from diffusion_core.unet import UNet
from pipelines.training.config import load_config
from pipelines.tuning.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
T = 1000
PREDICTIONS = ("eps", "x_start", "v", "score")
# 0-based timesteps of the linear T=1000 schedule from SNR ~ 1e4 (t = 0) to ~ 4e-5 (t = 999); with
# gamma = 5 the first two are clamped (SNR > gamma) and the rest are not.
STEPS = (0, 20, 150, 400, 700, 999)


def _linear_snr(num_timesteps: int = T) -> np.ndarray:
    """SNR_t = abar_t / (1 - abar_t) of the linear schedule, computed here from the betas."""
    abar = np.cumprod(1.0 - linear_betas(num_timesteps))
    return abar / (1.0 - abar)


def _make(**kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=kwargs.pop("num_timesteps", T), **kwargs))


# ---------------------------------------------------------------- the weight
def test_snr_array_is_abar_over_one_minus_abar() -> None:
    d = _make()
    assert d.snr.dtype == np.float64 and d.snr.shape == (T,)
    np.testing.assert_allclose(d.snr, _linear_snr(), rtol=1e-12)
    np.testing.assert_allclose(d.snr, d.alphas_cumprod / (1 - d.alphas_cumprod), rtol=0)


@pytest.mark.parametrize("gamma", [5.0, 1.0, 0.3])
def test_weight_matches_the_closed_form_on_both_sides_of_gamma(gamma: float) -> None:
    snr_all = _linear_snr()
    snr = torch.tensor(snr_all[list(STEPS)], dtype=torch.float64)
    assert (snr > gamma).any() and (snr < gamma).any()
    for prediction in PREDICTIONS:
        got = min_snr_weight(snr, gamma, prediction)
        assert got.shape == snr.shape and got.dtype == torch.float64
        for value, s in zip(got.tolist(), snr.tolist()):
            clamped = gamma if s > gamma else s
            expected = {"x_start": clamped, "eps": clamped / s, "v": clamped / (s + 1.0),
                        "score": clamped / s}[prediction]
            assert value == pytest.approx(expected, rel=1e-12), (prediction, s)
    # the two regimes in words: above gamma the x_0 weight is gamma and the eps weight gamma / SNR;
    # below it the eps weight is 1 (plain eps-MSE) and the v weight SNR / (SNR + 1)
    high, low = snr[0].item(), snr[-1].item()
    assert min_snr_weight(snr[:1], gamma, "x_start").item() == gamma
    assert min_snr_weight(snr[:1], gamma, "eps").item() == pytest.approx(gamma / high, rel=1e-12)
    assert min_snr_weight(snr[-1:], gamma, "eps").item() == 1.0
    assert min_snr_weight(snr[-1:], gamma, "v").item() == pytest.approx(low / (low + 1), rel=1e-12)


def test_weight_rejects_bad_arguments() -> None:
    snr = torch.ones(3)
    with pytest.raises(ValueError, match="prediction"):
        min_snr_weight(snr, 5.0, "noise")
    for gamma in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            min_snr_weight(snr, gamma, "eps")


# ---------------------------------------------------------------- the weighted losses
def _losses_for(prediction: str, eps_hat: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                schedule: str, **config) -> dict[str, torch.Tensor]:
    """Losses of a network of ``prediction`` whose noise estimate is ``eps_hat`` (the same network
    output converted to each parameterization)."""
    d = _make(prediction=prediction, schedule=schedule, **config)
    return d.training_losses(lambda x_t, tt: d.output_from_eps(x_t, tt, eps_hat), x0, t, noise=noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("gamma", [5.0, 0.5])
def test_weighted_losses_agree_across_parameterizations(schedule: str, gamma: float) -> None:
    """One network output in all four parameterizations. Its errors satisfy alpha dx_0 + sigma deps = 0,
    so the unweighted MSEs are |deps|^2 = SNR |dx_0|^2 (eps, score), |dx_0|^2 (x_start) and
    (SNR + 1) |dx_0|^2 (v), and every min_snr-weighted loss is min(SNR, gamma) |dx_0|^2."""
    x0 = grid_images((len(STEPS), 2, 4, 4), seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor(STEPS)
    d = _make(schedule=schedule)
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod))[t]
    assert (snr > gamma).any() and (snr < gamma).any()
    x_t = d.q_sample(x0, t, noise)
    xstart_mse = mean_flat((d.predict_xstart_from_eps(x_t, t, eps_hat) - x0) ** 2)
    expected = torch.clamp(snr, max=gamma) * xstart_mse

    weighted = {p: _losses_for(p, eps_hat, x0, t, noise, schedule, loss_weighting="min_snr", min_snr_gamma=gamma)
                for p in PREDICTIONS}
    plain = {p: _losses_for(p, eps_hat, x0, t, noise, schedule) for p in PREDICTIONS}
    # the unweighted MSEs relate as derived (so the weights below are the only thing that equalises them)
    torch.testing.assert_close(plain["x_start"]["loss"], xstart_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(plain["eps"]["loss"], snr * xstart_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(plain["score"]["loss"], snr * xstart_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(plain["v"]["loss"], (snr + 1) * xstart_mse, rtol=1e-9, atol=0)
    for p in PREDICTIONS:
        torch.testing.assert_close(weighted[p]["loss"], expected, rtol=1e-9, atol=0, msg=p)
        torch.testing.assert_close(weighted[p]["mse"], plain[p]["mse"], rtol=0, atol=0, msg=p)  # "mse" unweighted
    # in the brief's words: the eps loss is the x_start-MSE of pred_xstart times min(SNR, gamma)
    torch.testing.assert_close(weighted["eps"]["loss"], plain["x_start"]["mse"] * torch.clamp(snr, max=gamma),
                               rtol=1e-9, atol=0)
    # and the weighting is not a no-op on either side of gamma
    assert not torch.allclose(weighted["eps"]["loss"], plain["eps"]["loss"], rtol=1e-3)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("loss", ["simple", "vlb", "hybrid"])
def test_none_is_the_unweighted_loss_bit_for_bit(prediction: str, loss: str) -> None:
    """"none" (the default, whatever min_snr_gamma holds) gives exactly the loss of the formulas
    without weighting: mse, T * vb, mse + vlb_weight * T * vb."""
    variance = "fixed_small" if loss == "simple" else "learned_range"
    default = _make(num_timesteps=100, prediction=prediction, loss=loss, variance=variance)
    explicit = _make(num_timesteps=100, prediction=prediction, loss=loss, variance=variance,
                     loss_weighting="none", min_snr_gamma=0.7)
    assert default.config.loss_weighting == "none"
    model = ConvModel(2, 4 if variance == "learned_range" else 2)
    x0 = grid_images((4, 2, 6, 6))
    t = torch.tensor([0, 3, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = default.training_losses(model, x0, t, noise=noise)
    again = explicit.training_losses(model, x0, t, noise=noise)
    for key in out:
        assert torch.equal(out[key], again[key]), key
    if loss == "simple":
        assert torch.equal(out["loss"], out["mse"])
    elif loss == "vlb":
        assert torch.equal(out["loss"], out["vb"] * 100.0)
    else:
        assert torch.equal(out["loss"], out["mse"] + default.config.vlb_weight * 100.0 * out["vb"])


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_hybrid_weights_the_mse_part_only(prediction: str) -> None:
    kwargs = {"num_timesteps": 100, "prediction": prediction, "loss": "hybrid", "variance": "learned_range",
              "vlb_weight": 0.5}
    plain, weighted = _make(**kwargs), _make(**kwargs, loss_weighting="min_snr", min_snr_gamma=2.0)
    model = ConvModel(2, 4)
    x0 = grid_images((4, 2, 6, 6))
    t = torch.tensor([0, 3, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    a = plain.training_losses(model, x0, t, noise=noise)
    b = weighted.training_losses(model, x0, t, noise=noise)
    assert torch.equal(a["mse"], b["mse"]) and torch.equal(a["vb"], b["vb"])
    w = min_snr_weight(torch.from_numpy(plain.snr)[t].float(), 2.0, prediction)
    torch.testing.assert_close(b["loss"], w * b["mse"] + 0.5 * 100 * b["vb"], rtol=1e-6, atol=0)
    # the variance channels get the same gradient with and without the weighting (the vb term is not weighted)
    grads = []
    for d in (plain, weighted):
        raw = model(d.q_sample(x0, t, noise), t).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(d.training_losses(lambda x, tt: raw, x0, t, noise=noise)["loss"].sum(), raw)
        grads.append(grad)
    torch.testing.assert_close(grads[0][:, 2:], grads[1][:, 2:], rtol=0, atol=0)
    assert not torch.allclose(grads[0][:, :2], grads[1][:, :2])


# ---------------------------------------------------------------- the config
def test_config_checks_name_the_key() -> None:
    with pytest.raises(ValueError, match="loss_weighting='snr'.*none.*min_snr"):
        DiffusionConfig(loss_weighting="snr")
    for gamma in (0, 0.0, -2.0, math.inf, math.nan, True, "5"):
        with pytest.raises(ValueError, match="min_snr_gamma"):
            DiffusionConfig(min_snr_gamma=gamma)
    with pytest.raises(ValueError, match="loss_weighting='min_snr' needs loss 'simple' or 'hybrid'"):
        DiffusionConfig(loss="vlb", loss_weighting="min_snr")
    assert DiffusionConfig(loss="hybrid", loss_weighting="min_snr", min_snr_gamma=1).min_snr_gamma == 1


def test_round_trip_and_old_dicts() -> None:
    configs = [DiffusionConfig(), DiffusionConfig(loss_weighting="min_snr"),
               DiffusionConfig(prediction="v", loss="hybrid", variance="learned_range", loss_weighting="min_snr",
                               min_snr_gamma=1.5),
               DiffusionConfig(min_snr_gamma=3.0)]
    for config in configs:
        assert DiffusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # without weighting the dict has the keys it always had; with it, both keys are written
    old_keys = {"num_timesteps", "schedule", "prediction", "variance", "loss", "vlb_weight"}
    assert set(DiffusionConfig().to_dict()) == old_keys
    assert configs[1].to_dict()["loss_weighting"] == "min_snr" and configs[1].to_dict()["min_snr_gamma"] == 5.0
    assert set(configs[3].to_dict()) == old_keys | {"loss_weighting", "min_snr_gamma"}


def test_config_json_without_the_keys_loads(tmp_path: Path) -> None:
    unet = SMALL_UNET
    folder = tmp_path / "old"
    folder.mkdir()
    payload = {"format_version": FORMAT_VERSION, "unet": unet.to_dict(), "metadata": {},
               "diffusion": {"num_timesteps": 50, "schedule": "cosine", "prediction": "eps",
                             "variance": "fixed_small", "loss": "simple", "vlb_weight": 0.001}}
    (folder / CONFIG_NAME).write_text(json.dumps(payload))
    _, diffusion, _ = read_checkpoint_config(folder)
    assert (diffusion.loss_weighting, diffusion.min_snr_gamma) == ("none", 5.0)
    assert diffusion == DiffusionConfig(num_timesteps=50, schedule="cosine")
    # and a weighted model's config.json keeps its weighting
    weighted = DiffusionConfig(num_timesteps=50, loss_weighting="min_snr", min_snr_gamma=2.0)
    save_checkpoint(tmp_path / "new", UNet(unet).state_dict(), unet, weighted)
    assert read_checkpoint_config(tmp_path / "new")[1] == weighted


def test_training_config_yaml_overrides_and_sweeps(tmp_path: Path) -> None:
    base = load_config(TINY)
    assert (base.diffusion.loss_weighting, base.diffusion.min_snr_gamma) == ("none", 5.0)
    config = load_config(TINY, ["diffusion.loss_weighting=min_snr", "diffusion.min_snr_gamma=5"])
    assert (config.diffusion.loss_weighting, config.diffusion.min_snr_gamma) == ("min_snr", 5.0)
    assert isinstance(config.diffusion.min_snr_gamma, float)
    params = config.flat_params()
    assert params["diffusion.loss_weighting"] == "min_snr" and params["diffusion.min_snr_gamma"] == "5.0"
    text = TINY.read_text().replace("  loss: simple\n", "  loss: simple\n  loss_weighting: min_snr\n  min_snr_gamma: 2\n")
    (tmp_path / "c.yaml").write_text(text)
    from_yaml = load_config(tmp_path / "c.yaml")
    assert (from_yaml.diffusion.loss_weighting, from_yaml.diffusion.min_snr_gamma) == ("min_snr", 2.0)
    assert load_config(tmp_path / "c.yaml").replace({}) == from_yaml  # the resolved config round-trips
    with pytest.raises(ValueError, match="diffusion.*min_snr_gamma"):
        load_config(TINY, ["diffusion.min_snr_gamma=0"])
    with pytest.raises(ValueError, match="diffusion.*needs loss 'simple' or 'hybrid'"):
        load_config(TINY, ["diffusion.loss_weighting=min_snr", "diffusion.loss=vlb"])
    sweep = spec_from_dict({"metric": "loss", "search_space": {
        "diffusion.loss_weighting": {"grid_search": ["none", "min_snr"]},
        "diffusion.min_snr_gamma": {"choice": [1.0, 5.0]}}})
    sweep.check_against(base.replace({"data.shards": "unused"}))
    with pytest.raises(ValueError, match="search_space.diffusion.loss_weighting"):
        spec_from_dict({"metric": "loss", "search_space": {
            "diffusion.loss_weighting": {"choice": ["snr"]}}}).check_against(base)


# ---------------------------------------------------------------- with importance-sampled timesteps
def test_a_training_step_multiplies_min_snr_and_importance_weights() -> None:
    """With hybrid + min_snr + a warm ``loss_second_moment`` sampler, ``train_step`` backpropagates
    mean_i (w_i mse_i + vlb_weight T vb_i) / (T p_{t_i}): the Min-SNR weight inside the loss, the
    importance weight on top. v-prediction, so that w_i < 1 at every timestep."""
    from pipelines.training.step import train_step
    from pipelines.training.trainee import build_trainee
    from pipelines.training.worker import Worker

    config = load_config(TINY).replace({"data.shards": "unused", "diffusion.loss": "hybrid",
                                        "diffusion.variance": "learned_range", "model.out_channels": 2,
                                        "diffusion.prediction": "v", "diffusion.loss_weighting": "min_snr",
                                        "diffusion.min_snr_gamma": 5.0,
                                        "train.timestep_sampler": "loss_second_moment", "scaling.torch_threads": 1,
                                        "train.global_batch_size": 8})
    trainee = build_trainee(config, Worker(rank=0, world_size=1, device=torch.device("cpu")), None,
                            prepare=lambda net: net)
    diffusion = GaussianDiffusion(config.diffusion)
    sampler = trainee.timestep_sampler
    every_t = np.repeat(np.arange(sampler.num_timesteps), sampler.history)
    sampler.update(every_t, 1e-3 * (1 + every_t % 5))
    p = sampler.probabilities().copy()
    assert p.max() / p.min() > 4

    captured: list[dict[str, torch.Tensor]] = []
    real_losses = diffusion.training_losses

    def capturing(*args, **kwargs):
        out = real_losses(*args, **kwargs)
        captured.append({k: v.detach().clone() for k, v in out.items()})
        return out

    diffusion.training_losses = capturing
    x = torch.rand(8, *config.model.image_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with recording_backward() as backpropagated:
        losses, t, grad_norm = train_step(trainee, diffusion, x, config, bf16=False)
    assert len(captured) == 1 and len(backpropagated) == 1 and torch.isfinite(grad_norm)
    out = captured[0]
    num_timesteps = diffusion.num_timesteps
    w = min_snr_weight(torch.from_numpy(diffusion.snr)[t], 5.0, "v")
    assert (w < 0.999).all()
    bound = config.diffusion.vlb_weight * num_timesteps * out["vb"].double()
    per_example = w * out["mse"].double() + bound
    torch.testing.assert_close(out["loss"].double(), per_example, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses.double(), per_example, rtol=1e-5, atol=0)
    importance = 1.0 / (num_timesteps * torch.from_numpy(p)[t])
    expected = float((per_example * importance).mean())
    assert float(backpropagated[0]) == pytest.approx(expected, rel=1e-5)
    # neither weight alone gives that loss
    assert float((per_example).mean()) != pytest.approx(expected, rel=1e-3)
    assert float(((out["mse"].double() + bound) * importance).mean()) != pytest.approx(expected, rel=1e-3)
