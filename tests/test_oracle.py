"""The exact denoiser of a one-image data set: for data = {x0}, E[eps | x_t] =
(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). With it the bound and the samplers have closed forms:
every posterior KL is 0 for fixed_small, the decoder and prior terms are computed here by hand,
and every sampler returns x0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    OracleEps,
    grid_images,
    linear_betas,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion

T = 200
LN2 = math.log(2.0)


def phi(x: np.ndarray) -> np.ndarray:
    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in np.ravel(x)]).reshape(np.shape(x))


def hand_bound(x0: np.ndarray, variance: str) -> dict[str, np.ndarray]:
    """Prior, decoder and KL terms (bits/dim) for the oracle, from the formulas alone (float64).

    Decoder: p(x_0|x_1) has mean x0 exactly (posterior coefficient of x_1 is 0 at t = 0) and
    variance beta-tilde_1 (index 0 is clipped to index 1 for both fixed variances), so a pixel
    has probability Phi(w/s) - Phi(-w/s) (w = 1/255), or Phi(w/s) at -1 and +1.
    KL terms: the means agree, so KL = 0.5 (log(s_p^2/s_q^2) + s_q^2/s_p^2 - 1) per pixel.
    Prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)).
    """
    betas = linear_betas(T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    s = math.sqrt(beta_tilde[1])
    w = 1.0 / 255.0
    edge = (x0 < -0.999) | (x0 > 0.999)
    prob = np.where(edge, phi(np.full_like(x0, w / s)), phi(np.full_like(x0, w / s)) - phi(np.full_like(x0, -w / s)))
    decoder = -np.log(prob).mean() / LN2
    if variance == "fixed_small":
        kl = np.zeros(T - 1)
    else:  # fixed_large: p has variance beta_t, q has beta-tilde_t
        ratio = beta_tilde[1:] / betas[1:]
        kl = 0.5 * (-np.log(ratio) + ratio - 1) / LN2  # per pixel, same for every pixel
    mean, var = math.sqrt(abar[-1]) * x0, 1 - abar[-1]
    prior = (0.5 * (-math.log(var) + var + mean**2 - 1)).mean() / LN2
    return {"decoder": decoder, "kl": kl, "prior": prior, "total": prior + decoder + kl.sum()}


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bpd_loop_equals_hand_computation(variance):
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, variance=variance))
    x0 = grid_images((1, 1, 6, 6), seed=7)
    oracle = OracleEps(d, x0)
    out = d.calc_bpd_loop(oracle, x0.expand(2, -1, -1, -1), generator=torch.Generator().manual_seed(0))
    hand = hand_bound(x0.double().numpy()[0], variance)
    np.testing.assert_allclose(out["vb"][:, 0].numpy(), hand["decoder"], rtol=1e-4)
    np.testing.assert_allclose(out["vb"][:, 1:].numpy(), np.broadcast_to(hand["kl"], (2, T - 1)), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(out["prior_bpd"].numpy(), hand["prior"], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out["total_bpd"].numpy(), hand["total"], rtol=1e-4)
    assert torch.all(out["xstart_mse"] < 1e-8) and torch.all(out["mse"] < 1e-6)
    if variance == "fixed_small":
        assert torch.all(out["vb"][:, 1:].abs() < 2e-5)
    assert len(oracle.calls) == T


def test_bpd_estimate_of_the_oracle_matches_the_exact_total():
    """fixed_large: every term is deterministic, so the estimate only varies through the timesteps."""
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, variance="fixed_large"))
    x0 = grid_images((1, 1, 6, 6), seed=7)
    est = d.calc_bpd_estimate(OracleEps(d, x0), x0.expand(400, -1, -1, -1), num_samples=10,
                              generator=torch.Generator().manual_seed(3))
    hand = hand_bound(x0.double().numpy()[0], "fixed_large")["total"]
    values = est["total_bpd"].double()
    assert abs(values.mean().item() - hand) < 4 * values.std().item() / math.sqrt(400)
    assert torch.all(est["stderr"] > 0)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
def test_ancestral_sampling_returns_the_image(variance, clip):
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, variance=variance))
    x0 = grid_images((1, 3, 5, 5), seed=8)
    samples = d.p_sample_loop(OracleEps(d, x0), (3, 3, 5, 5), generator=torch.Generator().manual_seed(0),
                              clip_denoised=clip)
    assert samples.dtype == torch.float32 and samples.shape == (3, 3, 5, 5)
    assert (samples - x0).abs().max() < 1 / 255


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_ddim_returns_the_image(eta, num_steps):
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, schedule="cosine"))
    x0 = grid_images((1, 1, 5, 5), seed=9)
    samples = d.ddim_sample_loop(OracleEps(d, x0), (4, 1, 5, 5), num_steps=num_steps, eta=eta,
                                 generator=torch.Generator().manual_seed(1))
    assert (samples - x0).abs().max() < 1 / 255


def test_vlb_loss_of_the_oracle_is_zero_for_t_positive():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=T, loss="vlb"))
    x0 = grid_images((1, 1, 6, 6), seed=7)
    t = torch.arange(1, T, 7)
    out = d.training_losses(OracleEps(d, x0), x0.expand(len(t), -1, -1, -1), t,
                            generator=torch.Generator().manual_seed(0))
    assert torch.all(out["loss"].abs() < T * 2e-5)
    decoder = d.training_losses(OracleEps(d, x0), x0, torch.zeros(1, dtype=torch.long))["vb"]
    assert decoder.item() == pytest.approx(hand_bound(x0.double().numpy()[0], "fixed_small")["decoder"], rel=1e-4)
