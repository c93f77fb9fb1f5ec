"""Peer check against huggingface diffusers 0.42: the same betas, and for the same model output and
noise one ancestral step equals DDPMScheduler.step and one DDIM step equals DDIMScheduler.step.

diffusers uses 0-based timesteps too. It keeps its schedule in float32, where 1 - alpha_bar_t near
t = 0 has a relative error of ~3e-4 (alpha_bar_1 = 0.99978 is stored to ~6e-8), so the step
comparisons move the scheduler's arrays to float64 (recomputed by diffusers' own formulas from its
betas) and run both sides in float64; the betas themselves are compared as diffusers makes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from _diffusion_helpers import single_thread  # noqa: E402,F401 (autouse fixture)
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from diffusion_core import DiffusionConfig, GaussianDiffusion  # noqa: E402

T = 1000
SHAPE = (2, 3, 4, 4)
PREDICTION_TYPES = {"eps": "epsilon", "x_start": "sample", "v": "v_prediction"}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_float64(scheduler):
    """diffusers' schedule arrays in float64: linear betas re-made by its linspace formula, then
    alphas and alphas_cumprod exactly as its __init__ derives them."""
    config = scheduler.config
    scheduler.betas = torch.linspace(
        config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float64
    )
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=seeded(seed), dtype=torch.float64)


@pytest.mark.parametrize("num_timesteps", [1000, 250])
@pytest.mark.parametrize("schedule,name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_match(num_timesteps, schedule, name):
    scale = 1000 / num_timesteps
    ours = GaussianDiffusion(DiffusionConfig(num_timesteps=num_timesteps, schedule=schedule))
    theirs = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule=name,
                           beta_start=1e-4 * scale, beta_end=0.02 * scale)
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_ddpm_step_matches_diffusers(t, prediction, variance, clip):
    ours = GaussianDiffusion(DiffusionConfig(num_timesteps=T, prediction=prediction, variance=variance))
    theirs = in_float64(DDPMScheduler(
        num_train_timesteps=T, beta_schedule="linear", prediction_type=PREDICTION_TYPES[prediction],
        variance_type=variance, clip_sample=clip, clip_sample_range=1.0,
    ))
    channels = SHAPE[1] * (2 if variance == "learned_range" else 1)
    x_t = randn(SHAPE, 0)
    output = 2 * randn((SHAPE[0], channels, *SHAPE[2:]), 1)
    if variance == "learned_range":
        output[:, SHAPE[1]:] = output[:, SHAPE[1]:].clamp(-1, 1)
    expected = theirs.step(output, t, x_t, generator=seeded(2))
    noise = randn(SHAPE, 2)  # what diffusers drew with the same seed
    got = ours.p_sample(lambda x, tt: output, x_t, torch.full((SHAPE[0],), t), clip_denoised=clip, noise=noise)
    assert torch.allclose(got["pred_xstart"], expected.pred_original_sample, rtol=1e-9, atol=1e-9)
    assert torch.allclose(got["sample"], expected.prev_sample, rtol=1e-9, atol=1e-9)
    if clip:
        assert got["pred_xstart"].abs().max() <= 1.0


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "x_start", "v"])
@pytest.mark.parametrize("num_steps,step_index", [(50, 0), (50, 25), (50, 49), (10, 3)])
def test_ddim_step_matches_diffusers(num_steps, step_index, prediction, eta, clip):
    ours = GaussianDiffusion(DiffusionConfig(num_timesteps=T, prediction=prediction))
    theirs = in_float64(DDIMScheduler(
        num_train_timesteps=T, beta_schedule="linear", prediction_type=PREDICTION_TYPES[prediction],
        clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
    ))
    theirs.set_timesteps(num_steps)
    t = int(theirs.timesteps[step_index])
    t_prev = t - T // num_steps  # diffusers' "leading" spacing; below 0 means alpha_bar_prev = 1
    x_t, output, noise = randn(SHAPE, 0), 2 * randn(SHAPE, 1), randn(SHAPE, 2)
    # use_clipped_model_output: eps is recomputed from the clipped x_0, as p_mean_variance does
    expected = theirs.step(output, t, x_t, eta=eta, use_clipped_model_output=True,
                           variance_noise=noise if eta > 0 else None)
    n = SHAPE[0]
    got = ours.ddim_sample(lambda x, tt: output, x_t, torch.full((n,), t), torch.full((n,), max(t_prev, -1)),
                           eta=eta, clip_denoised=clip, noise=noise)
    assert torch.allclose(got["pred_xstart"], expected.pred_original_sample, rtol=1e-9, atol=1e-9)
    assert torch.allclose(got["sample"], expected.prev_sample, rtol=1e-9, atol=1e-9)
