"""Beta schedules: known values, scaling with T, the cosine closed form, dtype and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_core.schedule import cosine_beta_schedule, get_named_beta_schedule, linear_beta_schedule


def test_linear_1000_endpoints_and_spacing():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


@pytest.mark.parametrize("num_timesteps", [100, 250, 4000])
def test_linear_scales_with_T(num_timesteps):
    betas = linear_beta_schedule(num_timesteps)
    scale = 1000 / num_timesteps
    assert betas.shape == (num_timesteps,)
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * scale, rel=1e-12)
    # The overall noise level barely changes with T: alpha_bar at the end stays tiny.
    assert np.prod(1 - betas) < 1e-4


def test_cosine_matches_closed_form():
    num_timesteps, s = 1000, 0.008
    betas = get_named_beta_schedule("cosine", num_timesteps)
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    alphas_cumprod = np.cumprod(1.0 - betas)

    def f(tau):
        return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([f((i + 1) / num_timesteps) / f(0.0) for i in range(num_timesteps)])
    uncapped = betas < 0.999
    assert uncapped.sum() >= num_timesteps - 2  # only the very last step(s) hit the cap
    np.testing.assert_allclose(alphas_cumprod[uncapped], expected[uncapped], rtol=1e-9, atol=1e-15)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    assert np.all(np.diff(betas) > 0)
    assert np.all(betas > 0)


def test_cosine_small_T_is_valid():
    betas = cosine_beta_schedule(10)
    assert betas.shape == (10,) and np.all((betas > 0) & (betas <= 0.999)) and np.all(np.diff(betas) > 0)


def test_errors():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        get_named_beta_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="num_timesteps=1"):
        get_named_beta_schedule("cosine", 1)
    with pytest.raises(ValueError, match="too small for the linear schedule"):
        linear_beta_schedule(10)
