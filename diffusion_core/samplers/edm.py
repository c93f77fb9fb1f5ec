"""EDM's deterministic sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithm 1): Heun's second-order method on the probability-flow ODE, at the
noise levels of eq. 5 (rho = 7), for this project's discrete VP chain."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.common import batch_t, denoise, initial_noise, resolve_device
from diffusion_core.timesteps import karras_timesteps
from diffusion_core.types import Model, Progress

RHO = 7.0
"""rho of the noise levels (Karras et al. 2022, eq. 5 and sec. 3: the value of all their samplers)."""


@torch.no_grad()
def edm_heun_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    num_steps: int,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    device=None,
) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1, without churn) with
    S = ``num_steps`` steps on the noise levels of eq. 5 (rho = 7).

    The model as an EDM denoiser. The VP chain's x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is,
    divided by sqrt(abar_t), EDM's variance-exploding x = x_0 + sigma_t eps with
    sigma_t = sqrt((1 - abar_t) / abar_t). So D(x; sigma_t) = pred_xstart of the model called at
    (sqrt(abar_t) x, t): the project's conversion of the model output (eps, x_start, v or score
    models; the first C channels of a learned_range output), clamped to [-1, 1] when
    ``clip_denoised``. The ODE is dx/dsigma = (x - D(x; sigma)) / sigma (eq. 1 with sigma(t) = t,
    s(t) = 1).

    Noise levels. sigma_min = sigma_0 and sigma_max = sigma_{T-1} of the chain (0-based
    timesteps); the S levels of eq. 5 between them (:func:`diffusion_core.timesteps.karras_sigmas`)
    are snapped to timesteps s_0 = T-1 > ... > s_{S-1} = 0 (S >= 2) by
    :func:`diffusion_core.timesteps.karras_timesteps` as the "logsnr" spacing of DDIM and
    DPM-Solver++ snaps its targets: t interpolated linearly in log sigma between the chain's
    neighbouring levels and rounded, equal neighbours spread to consecutive timesteps (on the cosine
    schedule, whose sigma_{T-1} is about 30 times sigma_{T-2} at T = 1000, the first levels of a
    small S fall on T-1, T-2, ... in turn). The steps then run between the exact levels sigma_{s_i}
    of those integer timesteps, and the network is called with integer timesteps only, like every
    sampler of this package (what EDM itself does for a discrete model: its ``round_sigma``).
    sigma_S = 0.

    Steps, i = 0..S-1, from x = x_T / sqrt(abar_{T-1}) (x_T ~ N(0, I), the chain's starting level):

        d_i     = (x_i - D(x_i; sigma_i)) / sigma_i
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i                                (Euler)
        if sigma_{i+1} != 0:
            d'_i    = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}
            x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d'_i) / 2               (Heun's correction)

    The last step, to sigma = 0, is Euler's and returns D(x_{S-1}; sigma_{S-1}) itself. So
    2 S - 1 network evaluations (the registry's cost of "edm_heun"); at sigma = 0 the EDM and VP
    scales coincide (abar = 1). Deterministic given x_T: the stochastic churn of Algorithm 2
    (S_churn, S_tmin, S_tmax, S_noise) is not implemented. Coefficients in float64, applied as
    Python floats; x is kept in x_T's dtype (float32).

    Args:
        process: the diffusion process.
        model: callable (x_t float [N, C, H, W], t int64 [N]) -> [N, C or 2C, H, W], for example a
            ``diffusion_core.guidance.classifier_free_guidance`` wrapper.
        shape: (N, C, H, W).
        num_steps: S, 1 <= S <= T (S = 1: one Euler step from sigma_{T-1}, i.e. x0_hat at T-1).
        generator: torch.Generator on ``device`` or ``rng.RowGenerators``; draws x_T only (unless
            ``noise`` is given).
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp each D(x; sigma) (x0_hat) to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each step (0-based index).
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples, pixels in [-1, 1] when ``clip_denoised``.

    Raises:
        ValueError: on a bad num_steps (not an integer in [1, T]), shape/noise or model output shape.
    """
    steps = karras_timesteps(process.alphas_cumprod, num_steps, RHO)
    device = resolve_device(model, device)
    x_t = initial_noise(shape, noise, generator, device)
    abar = process.alphas_cumprod[steps]
    scale = np.sqrt(abar)  # x_VP = sqrt(abar) x_EDM
    sigma = np.append(np.sqrt((1.0 - abar) / abar), 0.0)
    n = x_t.shape[0]

    def denoised(x: torch.Tensor, i: int) -> torch.Tensor:
        """D(x; sigma_i): pred_xstart of the model at (sqrt(abar_{s_i}) x, s_i)."""
        t = batch_t(steps[i], n, device)
        return denoise(process, model, x * float(scale[i]), t, clip_denoised)[0]

    x = x_t * float(1.0 / scale[0])
    last = len(steps) - 1
    for i in range(len(steps)):
        x0 = denoised(x, i)
        if i == last:
            x = x0  # Euler to sigma = 0: x + (0 - sigma) (x - x0) / sigma
        else:
            h = float(sigma[i + 1] - sigma[i])
            d = (x - x0) * float(1.0 / sigma[i])
            x_euler = x + h * d
            d_next = (x_euler - denoised(x_euler, i + 1)) * float(1.0 / sigma[i + 1])
            x = x + (0.5 * h) * (d + d_next)
        if progress is not None:
            progress(i, len(steps))
    return x
