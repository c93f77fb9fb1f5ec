"""Samplers: determinism under a seeded generator, progress callbacks, DDIM timestep selection,
DDIM(eta=1, all steps) == DDPM with fixed_small, devices, clipping and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _diffusion_helpers import (
    ConvModel,
    CountingModel,
    single_thread,  # noqa: F401 (autouse fixture)
)

from diffusion_core import DiffusionConfig, GaussianDiffusion
from diffusion_core.samplers.common import model_device
from diffusion_core.timesteps import ddim_timesteps

T = 40
SHAPE = (3, 1, 6, 6)


def make(**kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(num_timesteps=T, **kwargs))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_samples_different_seed_different(sampler):
    d, model = make(), ConvModel()

    def run(seed):
        if sampler == "ddpm":
            return d.p_sample_loop(model, SHAPE, generator=seeded(seed))
        return d.ddim_sample_loop(model, SHAPE, num_steps=10, eta=0.5, generator=seeded(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.dtype == torch.float32 and a.shape == SHAPE
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert a.min() >= -1 and a.max() <= 1  # clip_denoised=True by default


def test_ddpm_progress_noise_and_calls():
    d = make(variance="learned_range")
    model = CountingModel(ConvModel(1, 2))
    steps = []
    noise = torch.randn(SHAPE, generator=seeded(5))
    out = d.p_sample_loop(model, SHAPE, generator=seeded(0), progress=lambda i, n: steps.append((i, n)), noise=noise)
    assert steps == [(i, T) for i in range(T)]
    assert [int(t[0]) for t in model.calls] == list(range(T - 1, -1, -1))
    again = d.p_sample_loop(model.model, SHAPE, generator=seeded(0), noise=noise)
    assert torch.equal(out, again)


def test_ddim_eta1_over_all_steps_is_ddpm_fixed_small():
    """Song et al. 2021, eq. 16: eta = 1 with every timestep gives the DDPM posterior variance."""
    d, model = make(), ConvModel(seed=2)
    ddpm = d.p_sample_loop(model, SHAPE, generator=seeded(3), clip_denoised=False)
    ddim = d.ddim_sample_loop(model, SHAPE, num_steps=T, eta=1.0, generator=seeded(3), clip_denoised=False)
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_ddim_eta0_is_deterministic_given_noise_and_uses_num_steps_calls():
    d = make(prediction="v")
    model = CountingModel(ConvModel())
    noise = torch.randn(SHAPE, generator=seeded(0))
    steps = []
    a = d.ddim_sample_loop(model, SHAPE, num_steps=7, noise=noise, progress=lambda i, n: steps.append((i, n)))
    b = d.ddim_sample_loop(model.model, SHAPE, num_steps=7, noise=noise, generator=seeded(99))
    assert torch.equal(a, b)  # eta = 0 draws nothing after x_T
    assert [int(t[0]) for t in model.calls] == ddim_timesteps(T, 7).tolist()
    assert steps == [(i, 7) for i in range(7)]


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    assert ddim_timesteps(1000, 1).tolist() == [999]
    assert ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    steps = ddim_timesteps(1000, 37)
    assert len(np.unique(steps)) == 37 and np.all(np.diff(steps) < 0)
    assert np.abs(np.diff(steps) - np.diff(steps).mean()).max() <= 1  # evenly spaced up to rounding
    for bad in (0, 1001, 2.0):
        with pytest.raises(ValueError, match=r"num_steps=.* must be an integer in \[1, 1000\]"):
            ddim_timesteps(1000, bad)


def test_single_ddim_step_formula():
    """Song et al. 2021, eq. 12 written out for one step with a known eps."""
    d = make()
    x = torch.randn(SHAPE, generator=seeded(0), dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    z = torch.randn(SHAPE, generator=seeded(2), dtype=torch.float64)
    t, t_prev, eta = 30, 20, 0.7
    out = d.ddim_sample(lambda xx, tt: eps, x, torch.full((3,), t), torch.full((3,), t_prev), eta=eta,
                        clip_denoised=False, noise=z)
    a_t, a_p = d.alphas_cumprod[t], d.alphas_cumprod[t_prev]
    sigma = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expected = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * eps + sigma * z
    assert torch.allclose(out["sample"], expected, atol=1e-12)
    assert torch.allclose(out["pred_xstart"], x0, atol=1e-12)


def test_p_sample_adds_no_noise_at_t0():
    d = make()
    x = torch.randn(SHAPE, generator=seeded(0))
    t = torch.tensor([0, 0, 5])
    model = ConvModel()
    out = d.p_sample(model, x, t, clip_denoised=False, noise=torch.ones(SHAPE))
    mean = d.p_mean_variance(model, x, t)["mean"]
    assert torch.equal(out["sample"][:2], mean[:2])
    std = float(np.sqrt(d.posterior_variance[5]))
    assert torch.allclose(out["sample"][2], mean[2] + std, atol=1e-6)


def test_device_defaults():
    assert model_device(ConvModel()) == torch.device("cpu")
    assert model_device(lambda x, t: x) == torch.device("cpu")
    d = make()
    out = d.ddim_sample_loop(lambda x, t: torch.zeros_like(x), SHAPE, num_steps=3, device="cpu")
    assert out.device.type == "cpu"


def test_sampler_errors():
    d, model = make(), ConvModel()
    with pytest.raises(ValueError, match="shape must be"):
        d.p_sample_loop(model, (1, 6, 6))
    with pytest.raises(ValueError, match="noise has shape"):
        d.ddim_sample_loop(model, SHAPE, num_steps=5, noise=torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="eta=-0.1"):
        d.ddim_sample_loop(model, SHAPE, num_steps=5, eta=-0.1)
    with pytest.raises(ValueError, match=r"num_steps=41"):
        d.ddim_sample_loop(model, SHAPE, num_steps=41)
    with pytest.raises(ValueError, match="t_prev must satisfy -1 <= t_prev < t"):
        d.ddim_sample(model, torch.zeros(SHAPE), torch.full((3,), 5), torch.full((3,), 5))
    with pytest.raises(ValueError, match="expected"):
        d.p_sample_loop(ConvModel(1, 2), SHAPE)
