"""prediction="score": a network that outputs s = -eps / sqrt(1 - abar) directly is the eps-network
eps = -sqrt(1 - abar) s in every respect (p_mean_variance, the bound, score(), the losses)."""

from __future__ import annotations

import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    grid_images,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion

T = 50


def pair(variance: str = "fixed_small", loss: str = "simple"):
    """(eps diffusion, score diffusion, eps model, the equivalent score model)."""
    eps_d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, variance=variance, loss=loss))
    score_d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, variance=variance, loss=loss, prediction="score"))
    channels = 2 if variance == "learned_range" else 1
    conv = ConvModel(1, channels, seed=4).double()

    def eps_model(x, t):
        return conv(x.double(), t).to(x.dtype)

    def score_model(x, t):
        out = eps_model(x, t).double()
        sigma = torch.from_numpy(eps_d.sqrt_one_minus_alphas_cumprod)[t].reshape(-1, 1, 1, 1)
        return torch.cat([-out[:, :1] / sigma, out[:, 1:]], dim=1).to(x.dtype)

    return eps_d, score_d, eps_model, score_model


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_and_score_match_the_eps_model(variance):
    eps_d, score_d, eps_model, score_model = pair(variance)
    x = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 1, 25, T - 1])
    for clip in (False, True):
        a = eps_d.p_mean_variance(eps_model, x, t, clip_denoised=clip)
        b = score_d.p_mean_variance(score_model, x, t, clip_denoised=clip)
        for key in ("mean", "variance", "log_variance", "pred_xstart", "pred_eps"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score_d.score(score_model, x, t), eps_d.score(eps_model, x, t), rtol=1e-9, atol=1e-9)
    assert torch.equal(score_d.score(score_model, x, t), score_model(x, t)[:, :1])


@pytest.mark.parametrize("loss", ["simple", "vlb", "hybrid"])
def test_training_loss_is_the_eps_mse(loss):
    eps_d, score_d, eps_model, score_model = pair("learned_range" if loss == "hybrid" else "fixed_small", loss)
    x0 = grid_images((4, 1, 5, 5), seed=1, dtype=torch.float64)
    t = torch.tensor([0, 3, 25, T - 1])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = eps_d.training_losses(eps_model, x0, t, noise=noise)
    b = score_d.training_losses(score_model, x0, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-9)
    # the documented form: (1 - abar) |s - (-eps / sqrt(1 - abar))|^2, mean over C, H, W
    x_t = score_d.q_sample(x0, t, noise)
    abar = torch.from_numpy(score_d.alphas_cumprod)[t].reshape(-1, 1, 1, 1)
    dsm = ((1 - abar) * (score_model(x_t, t)[:, :1] + noise / (1 - abar).sqrt()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(b["mse"], dsm, rtol=1e-9, atol=1e-9)


def test_the_bound_matches_the_eps_model():
    eps_d, score_d, eps_model, score_model = pair("fixed_large")
    x0 = grid_images((3, 1, 4, 4), seed=3)
    a = eps_d.calc_bpd_loop(eps_model, x0, generator=torch.Generator().manual_seed(0))
    b = score_d.calc_bpd_loop(score_model, x0, generator=torch.Generator().manual_seed(0))
    for key in ("total_bpd", "vb", "mse"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
    a = eps_d.calc_bpd_estimate(eps_model, x0, num_samples=6, generator=torch.Generator().manual_seed(1))
    b = score_d.calc_bpd_estimate(score_model, x0, num_samples=6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["total_bpd"], b["total_bpd"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,kwargs", [
    ("p_sample_loop", {}), ("ddim_sample_loop", {"num_steps": 8}), ("dpm_solver_sample_loop", {"num_steps": 8}),
    ("pc_sample_loop", {"num_steps": 8}), ("langevin_sample_loop", {"num_steps": 8}),
])
def test_samplers_match_the_eps_model(sampler, kwargs):
    eps_d, score_d, eps_model, score_model = pair()
    a = getattr(eps_d, sampler)(eps_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    b = getattr(score_d, sampler)(score_model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
