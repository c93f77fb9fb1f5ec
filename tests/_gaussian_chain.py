"""Gaussian data N(MU, S^2 I), its exact denoiser, and the moments the samplers must give on it.

The marginal of such data is q(x_t) = N(sqrt(abar_t) MU, sigma_t^2 I) with
sigma_t^2 = abar_t S^2 + 1 - abar_t, so the exact denoiser is linear in x_t:

    E[x_0 | x_t] = MU + k_t (x_t - sqrt(abar_t) MU),   k_t = S^2 sqrt(abar_t) / sigma_t^2,
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) MU) / sigma_t^2.

Every pixel of every image then follows the same chain, and the functions below carry the mean and
variance of one pixel (float64) through the samplers' steps:

- the ancestral predictor (Ho et al. 2020, Algorithm 2, fixed_small variance) is linear-Gaussian,
  x_{t-1} = A_t x_t + B_t + sigma~_t z, so its moments are exact;
- the Langevin corrector (Song et al. 2021, SDEs, Alg. 5) scales its step per image by
  ||z||^2 / ||w||^2 (w = x - E[x_t], D pixels), so its moments are the expectation over z and w to
  second order in 1/D (see :func:`langevin_step`).

Timesteps are 0-based (index t is the paper's t + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffusion_core import GaussianDiffusion
from diffusion_core.timesteps import sampling_timesteps

MU, S = 0.3, 0.2


@dataclass(frozen=True)
class Moments:
    """Mean and variance of one pixel (float64; all pixels share them)."""

    mean: float
    variance: float


class GaussianDenoiser:
    """The exact model of N(MU, S^2 I) data in ``diffusion.config.prediction``'s form: a callable
    (x_t float [N, C, H, W], t int64 [N]) -> [N, C, H, W] in x_t's dtype (float64 inside)."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion
        self.abar = torch.from_numpy(diffusion.alphas_cumprod)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].reshape(-1, 1, 1, 1)
        x = x_t.double()
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)
        return self.diffusion.output_from_eps(x, t, eps).to(x_t.dtype)


def marginal(d: GaussianDiffusion, t: int) -> Moments:
    """q(x_t) of one pixel: mean sqrt(abar_t) MU, variance abar_t S^2 + 1 - abar_t."""
    abar = d.alphas_cumprod[t]
    return Moments(float(np.sqrt(abar) * MU), float(abar * S**2 + 1 - abar))


def denoised(d: GaussianDiffusion, t: int, x: Moments) -> Moments:
    """Moments of E[x_0 | x_t] = MU + k_t (x_t - sqrt(abar_t) MU) for x_t with moments ``x``."""
    level = marginal(d, t)
    gain = S**2 * np.sqrt(d.alphas_cumprod[t]) / level.variance
    return Moments(MU + gain * (x.mean - level.mean), gain**2 * x.variance)


def target(d: GaussianDiffusion) -> Moments:
    """E[x_0 | x_t] at t = 0 for x_t ~ q(x_t): N(MU, S^4 abar_0 / sigma_0^2), what every sampler targets."""
    return denoised(d, 0, marginal(d, 0))


def ancestral_step(d: GaussianDiffusion, t: int, x: Moments) -> Moments:
    """One ``p_sample`` step t -> t-1 with the exact denoiser and the fixed_small variance
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (none at t = 0), exactly:

        mean = c1_t x0_hat + c2_t x_t   (Ho et al. 2020, eq. 7),
        c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),  c2_t = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t).
    """
    beta, abar = d.betas[t], d.alphas_cumprod[t]
    abar_prev = d.alphas_cumprod[t - 1] if t > 0 else 1.0
    c1 = beta * np.sqrt(abar_prev) / (1 - abar)
    c2 = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    level = marginal(d, t)
    gain = S**2 * np.sqrt(abar) / level.variance  # x0_hat = MU + gain (x - level.mean)
    slope, offset = c1 * gain + c2, c1 * (MU - gain * level.mean)
    noise = beta * (1 - abar_prev) / (1 - abar) if t > 0 else 0.0
    return Moments(slope * x.mean + offset, slope**2 * x.variance + noise)


def langevin_step(d: GaussianDiffusion, t: int, x: Moments, snr: float, pixels: int) -> Moments:
    """Expected moments after one corrector step at level t on images of D = ``pixels`` pixels.

    With w = x - E[x_t] (one image), s = -w / sigma_t^2 the exact score, z ~ N(0, I) and
    c = 2 alpha_t snr^2 sigma_t^2, the step is w' = w (1 - c ||z||^2/||w||^2) + sqrt(2 c sigma_t^2
    ||z||^2 / ||w||^2) z. The cross term is odd in z; E||z||^2 = D, E||z||^4 = D (D + 2), and for w
    ~ N(0, u I) the inverse chi-square mean E[1/||w||^2] = 1 / ((D - 2) u). So, per pixel, with
    u = E[w^2],

        u' = u - 2c + (c^2 + 2 c sigma_t^2) (D + 2) / ((D - 2) u),
        E[w'] = E[w] (1 - c D / ((D - 2) u)),

    exact but for the spread of ||w|| between images beyond the chi-square's (order 1/D^2) and the
    offset E[w] inside ||w|| (second order in E[w]). D -> infinity gives the deterministic step
    size eta = 2 alpha_t snr^2 sigma_t^4 / u.
    """
    level = marginal(d, t)
    c = 2 * (1 - d.betas[t]) * snr**2 * level.variance
    offset = x.mean - level.mean
    u = offset**2 + x.variance
    offset_after = offset * (1 - c * pixels / ((pixels - 2) * u))
    u_after = u - 2 * c + (c**2 + 2 * c * level.variance) * (pixels + 2) / ((pixels - 2) * u)
    return Moments(level.mean + offset_after, u_after - offset_after**2)


def pc_moments(d: GaussianDiffusion, corrector_steps: int, snr: float, pixels: int) -> Moments:
    """``pc_sample_loop`` with S = T levels (ancestral predictor) from x_T ~ N(0, I): at each t =
    T-1, ..., 0, ``corrector_steps`` Langevin steps then one ancestral step. ``corrector_steps=0``
    gives the ancestral chain exactly."""
    x = Moments(0.0, 1.0)
    for t in range(d.num_timesteps - 1, -1, -1):
        for _ in range(corrector_steps):
            x = langevin_step(d, t, x, snr, pixels)
        x = ancestral_step(d, t, x)
    return x


def langevin_moments(d: GaussianDiffusion, num_steps: int, corrector_steps: int, snr: float, pixels: int) -> Moments:
    """``langevin_sample_loop`` (uniform levels): ``corrector_steps`` Langevin steps at each level,
    then E[x_0 | x] at the last level."""
    levels = sampling_timesteps(d.alphas_cumprod, num_steps, "uniform")
    x = Moments(0.0, 1.0)
    for t in levels:
        for _ in range(corrector_steps):
            x = langevin_step(d, int(t), x, snr, pixels)
    return denoised(d, int(levels[-1]), x)
