"""GaussianDiffusion: schedule arrays, forward process, posterior, parameterizations, score,
p_mean_variance, training losses and input errors, all against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    OracleEps,
    grid_images,
    linear_betas,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion, bound

T = 100


def make(**kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=kwargs.pop("num_timesteps", T), **kwargs))


# ---------------------------------------------------------------- arrays
def test_arrays_are_float64_and_consistent():
    d = make()
    betas = linear_betas(T)
    np.testing.assert_allclose(d.betas, betas, rtol=1e-14)
    abar = np.cumprod(1 - betas)
    for name in ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
                 "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                 "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
        arr = getattr(d, name)
        assert arr.dtype == np.float64 and arr.shape == (T,), name
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    np.testing.assert_allclose(d.alphas_cumprod_prev[1:], abar[:-1], rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / abar - 1), rtol=1e-12)
    # beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Ho et al. eq. 7)
    abar_prev = np.append(1.0, abar[:-1])
    posterior = (1 - abar_prev) / (1 - abar) * betas
    np.testing.assert_allclose(d.posterior_variance, posterior, rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(posterior[1]), rel=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(posterior[1:]), rtol=1e-12)


def test_extract_casts_after_gathering():
    d = make()
    t = torch.tensor([0, 5, 99])
    x = torch.zeros(3, 2, 4, 4)
    out = d.extract(d.sqrt_recipm1_alphas_cumprod, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    expected = torch.tensor(d.sqrt_recipm1_alphas_cumprod[[0, 5, 99]], dtype=torch.float64).float()
    assert torch.equal(out.flatten(), expected)
    assert d.extract(d.betas, t, x.double()).dtype == torch.float64


# ---------------------------------------------------------------- forward process
def test_q_sample_moments_match_closed_form():
    d = make()
    draws = 20000
    x0 = grid_images((1, 1, 2, 2), seed=1)
    for t_index in (0, 10, 99):
        t = torch.full((draws,), t_index)
        g = torch.Generator().manual_seed(t_index)
        x_t = d.q_sample(x0.expand(draws, -1, -1, -1), t, generator=g).double()
        abar = np.prod(1 - linear_betas(T)[: t_index + 1])
        mean, var = x_t.mean(0), x_t.var(0)
        se_mean = math.sqrt((1 - abar) / draws)
        assert torch.allclose(mean, math.sqrt(abar) * x0[0].double(), atol=5 * se_mean)
        assert torch.allclose(var, torch.full_like(var, 1 - abar), rtol=5 * math.sqrt(2 / draws))


def test_q_sample_with_noise_and_q_mean_variance():
    d = make()
    x0 = grid_images((3, 2, 4, 4))
    t = torch.tensor([0, 42, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    abar = torch.tensor(d.alphas_cumprod[[0, 42, 99]]).reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    assert torch.allclose(d.q_sample(x0, t, noise).double(), expected, atol=1e-6)
    mean, var, log_var = d.q_mean_variance(x0, t)
    assert mean.shape == var.shape == log_var.shape == x0.shape
    assert torch.allclose(mean.double(), abar.sqrt() * x0.double(), atol=1e-6)
    assert torch.allclose(log_var.double(), torch.log(1 - abar).expand_as(log_var), rtol=1e-6)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    d = make()
    betas = linear_betas(T)
    abar = np.cumprod(1 - betas)
    x0 = grid_images((4, 1, 3, 3), seed=2).double()
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t_list = [1, 2, 50, 99]
    mean, var, log_var = d.q_posterior_mean_variance(x0, x_t, torch.tensor(t_list))
    for i, t in enumerate(t_list):
        alpha, abar_prev = 1 - betas[t], abar[t - 1]
        # q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta): precision alpha/beta in x_{t-1}
        precision = alpha / betas[t] + 1 / (1 - abar_prev)
        natural = math.sqrt(alpha) * x_t[i] / betas[t] + math.sqrt(abar_prev) * x0[i] / (1 - abar_prev)
        expected_mean = natural / precision
        assert torch.allclose(mean[i], expected_mean, rtol=1e-10, atol=1e-12)
        assert torch.allclose(var[i], torch.full_like(var[i], 1 / precision), rtol=1e-10)
        assert torch.allclose(log_var[i], torch.full_like(var[i], -math.log(precision)), rtol=1e-10)
    mean0, var0, log_var0 = d.q_posterior_mean_variance(x0, x_t, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(mean0, x0) and torch.all(var0 == 0)
    assert torch.allclose(log_var0, torch.full_like(log_var0, d.posterior_log_variance_clipped[1]))


# ---------------------------------------------------------------- parameterizations
@pytest.mark.parametrize("dtype,t_list,atol", [
    (torch.float32, [0, 1, 30, 50, 70], 1e-5),  # float32 where 1/sqrt(abar) is moderate
    (torch.float64, [0, 1, 30, 70, 99], 1e-9),  # float64 up to the end of the cosine schedule
])
def test_conversions_round_trip(dtype, t_list, atol):
    d = make(schedule="cosine")
    x0 = grid_images((5, 3, 4, 4), dtype=dtype)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    t = torch.tensor(t_list)
    x_t = d.q_sample(x0, t, eps)
    v = d.predict_v(x0, t, eps)
    abar = torch.tensor(d.alphas_cumprod[t.numpy()], dtype=dtype).reshape(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, atol=atol)
    assert torch.allclose(d.predict_xstart_from_eps(x_t, t, eps), x0, atol=atol)
    assert torch.allclose(d.predict_eps_from_xstart(x_t, t, x0), eps, atol=atol)
    assert torch.allclose(d.predict_xstart_from_v(x_t, t, v), x0, atol=atol)
    assert torch.allclose(d.predict_eps_from_v(x_t, t, v), eps, atol=atol)
    assert torch.allclose(d.predict_v_from_eps(x_t, t, eps), v, atol=atol)
    assert torch.allclose(d.predict_v_from_xstart(x_t, t, x0), v, atol=atol)


def test_score_is_tweedie_and_exact_for_gaussian_data():
    """For x_0 ~ N(0, s^2 I): x_t ~ N(0, (abar s^2 + 1 - abar) I), E[eps|x_t] = sqrt(1-abar) x_t / that,
    and grad log q(x_t) = -x_t / (abar s^2 + 1 - abar) (computed here by autograd of the density)."""
    d = make(num_timesteps=50)
    s2 = 0.25
    abar_table = torch.tensor(d.alphas_cumprod)

    def exact_eps(x_t, t):
        abar = abar_table[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
        return (1 - abar).sqrt() * x_t / (abar * s2 + 1 - abar)

    t = torch.tensor([0, 10, 25, 49])
    x_t = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = d.score(exact_eps, x_t, t)
    assert torch.allclose(score, -exact_eps(x_t, t) / (1 - abar_table[t]).sqrt().reshape(-1, 1, 1, 1))
    x = x_t.clone().requires_grad_(True)
    var = (abar_table[t] * s2 + 1 - abar_table[t]).reshape(-1, 1, 1, 1)
    log_q = torch.distributions.Normal(0.0, var.sqrt()).log_prob(x).sum()
    (grad,) = torch.autograd.grad(log_q, x)
    assert torch.allclose(score, grad, rtol=1e-10)


# ---------------------------------------------------------------- p_mean_variance
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
def test_p_mean_variance_values(variance, prediction):
    d = make(variance=variance, prediction=prediction)
    x_t = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 99])
    out_channels = 4 if variance == "learned_range" else 2
    raw = torch.randn(4, out_channels, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    raw[:, 2:] = raw[:, 2:].clamp(-1, 1)
    out = d.p_mean_variance(lambda x, tt: raw, x_t, t)
    for key in ("mean", "variance", "log_variance", "pred_xstart", "pred_eps"):
        assert out[key].shape == x_t.shape, key
    abar = torch.tensor(d.alphas_cumprod[t.numpy()]).reshape(-1, 1, 1, 1)
    # x_t = sqrt(abar) x0 + sqrt(1-abar) eps must hold for the returned pair
    assert torch.allclose(abar.sqrt() * out["pred_xstart"] + (1 - abar).sqrt() * out["pred_eps"], x_t, atol=1e-9)
    model_out = raw[:, :2]
    if prediction == "eps":
        assert torch.allclose(out["pred_eps"], model_out)
    elif prediction == "x_start":
        assert torch.allclose(out["pred_xstart"], model_out)
    else:
        v = abar.sqrt() * out["pred_eps"] - (1 - abar).sqrt() * out["pred_xstart"]
        assert torch.allclose(v, model_out, atol=1e-9)
    expected_mean, _, _ = d.q_posterior_mean_variance(out["pred_xstart"], x_t, t)
    assert torch.allclose(out["mean"], expected_mean)
    pv, betas = torch.tensor(d.posterior_variance), torch.tensor(d.betas)
    if variance == "fixed_small":
        expected_log = torch.log(torch.cat([pv[1:2], pv[1:]]))[t].reshape(-1, 1, 1, 1).expand_as(x_t)
    elif variance == "fixed_large":
        expected_log = torch.log(torch.cat([pv[1:2], betas[1:]]))[t].reshape(-1, 1, 1, 1).expand_as(x_t)
    else:  # Nichol & Dhariwal eq. 15
        frac = (raw[:, 2:] + 1) / 2
        min_log = torch.log(torch.cat([pv[1:2], pv[1:]]))[t].reshape(-1, 1, 1, 1)
        expected_log = frac * torch.log(betas)[t].reshape(-1, 1, 1, 1) + (1 - frac) * min_log
    assert torch.allclose(out["log_variance"], expected_log, rtol=1e-12)
    if variance == "fixed_small":  # the variance itself is beta-tilde, 0 at t = 0; only its log is clipped
        assert torch.allclose(out["variance"], pv[t].reshape(-1, 1, 1, 1).expand_as(x_t), rtol=1e-12)
        assert torch.all(out["variance"][0] == 0)
    else:
        assert torch.allclose(out["variance"], expected_log.exp(), rtol=1e-12)


def test_p_mean_variance_clipping_recomputes_mean_and_eps():
    d = make(prediction="x_start")
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3, 40, 99])
    raw = 3 * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = d.p_mean_variance(lambda x, tt: raw, x_t, t, clip_denoised=True)
    assert torch.equal(out["pred_xstart"], raw.clamp(-1, 1))
    expected_mean, _, _ = d.q_posterior_mean_variance(raw.clamp(-1, 1), x_t, t)
    assert torch.allclose(out["mean"], expected_mean)
    assert torch.allclose(d.predict_xstart_from_eps(x_t, t, out["pred_eps"]), out["pred_xstart"], atol=1e-5)
    shifted = d.p_mean_variance(lambda x, tt: raw, x_t, t, denoised_fn=lambda x0: x0 * 0.5)
    assert torch.allclose(shifted["pred_xstart"], raw * 0.5)


# ---------------------------------------------------------------- training losses
@pytest.mark.parametrize("loss", ["simple", "vlb", "hybrid"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
def test_training_losses_all_combinations(loss, variance, prediction):
    d = make(loss=loss, variance=variance, prediction=prediction)
    model = ConvModel(2, 4 if variance == "learned_range" else 2)
    x0 = grid_images((4, 2, 6, 6))
    t = torch.tensor([0, 1, 50, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = d.training_losses(model, x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"}
    for value in out.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    x_t = d.q_sample(x0, t, noise)
    target = {"eps": noise, "x_start": x0, "v": d.predict_v(x0, t, noise)}[prediction]
    expected_mse = ((target - model(x_t, t)[:, :2]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(out["mse"], expected_mse, rtol=1e-5)
    if loss == "simple":
        assert torch.equal(out["loss"], out["mse"]) and torch.all(out["vb"] == 0)
    elif loss == "vlb":
        assert torch.allclose(out["loss"], T * out["vb"]) and torch.all(out["vb"] > 0)
    else:
        assert torch.allclose(out["loss"], out["mse"] + d.config.vlb_weight * T * out["vb"])
    out["loss"].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_vb_term_matches_vb_terms_bpd():
    d = make(loss="vlb", variance="learned_range")
    model = ConvModel(1, 2)
    x0 = grid_images((3, 1, 4, 4))
    t = torch.tensor([0, 7, 99])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    out = d.training_losses(model, x0, t, noise=noise)
    x_t = d.q_sample(x0, t, noise)
    direct = bound.vb_terms_bpd(d.process, model(x_t, t), x0, x_t, t)["output"]
    assert torch.allclose(out["vb"], direct)


def test_hybrid_stops_the_gradient_of_the_mean():
    """d(hybrid)/d(mean channels) == d(simple)/d(mean channels); the vb term only reaches the variance."""
    d = make(loss="hybrid", variance="learned_range", vlb_weight=0.5)
    x0 = grid_images((3, 1, 4, 4))
    t = torch.tensor([0, 20, 80])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    raw = (0.5 * torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    hybrid = d.training_losses(lambda x, tt: raw, x0, t, noise=noise)
    (grad_hybrid,) = torch.autograd.grad(hybrid["loss"].sum(), raw, retain_graph=True)
    (grad_simple,) = torch.autograd.grad(hybrid["mse"].sum(), raw)
    assert torch.allclose(grad_hybrid[:, :1], grad_simple[:, :1])
    assert torch.all(grad_simple[:, 1:] == 0) and grad_hybrid[:, 1:].abs().sum() > 0
    # without the stop-gradient the vlb term would move the mean channels too
    vlb = GaussianDiffusion(DiffusionConfig(num_timesteps=T, loss="vlb", variance="learned_range"))
    (grad_vlb,) = torch.autograd.grad(vlb.training_losses(lambda x, tt: raw, x0, t, noise=noise)["loss"].sum(), raw)
    assert grad_vlb[:, :1].abs().sum() > 0


def test_vlb_is_zero_for_the_oracle_at_t_positive():
    d = make(loss="vlb")
    x0 = grid_images((1, 1, 4, 4), seed=3)
    t = torch.tensor([1, 2, 30, 60, 99])
    out = d.training_losses(OracleEps(d, x0), x0.expand(5, -1, -1, -1), t)
    assert torch.all(out["vb"].abs() < 1e-5), out["vb"]
    assert torch.all(out["mse"] < 1e-8)


# ---------------------------------------------------------------- errors
def test_errors_name_the_bad_value():
    d = make()
    x = torch.zeros(2, 1, 4, 4)
    model = ConvModel()
    with pytest.raises(ValueError, match=r"t must be in \[0, 99\]"):
        d.q_sample(x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="timestep -1"):
        d.training_losses(model, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"shape \[N\] = \[2\]"):
        d.q_sample(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        d.q_sample(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        d.q_sample(torch.zeros(2, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise has shape"):
        d.q_sample(x, torch.tensor([0, 1]), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="floating-point"):
        d.q_sample(x.long(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected \(2, 1, 4, 4\).*C channels"):
        d.p_mean_variance(ConvModel(1, 2), x, torch.tensor([0, 1]))
    learned = make(variance="learned_range")
    with pytest.raises(ValueError, match=r"expected \(2, 2, 4, 4\).*2C channels"):
        learned.training_losses(model, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="DiffusionConfig"):
        GaussianDiffusion({"num_timesteps": 10})
