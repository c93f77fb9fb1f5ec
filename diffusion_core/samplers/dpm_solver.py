"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2): the solver of the diffusion ODE
in its data-prediction form, of order 1 or 2, and its stochastic counterpart for the reverse SDE."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.common import batch_t, denoise, initial_noise, noise_like, resolve_device
from diffusion_core.samplers.registry import ORDER, DPMAlgorithm
from diffusion_core.timesteps import sampling_timesteps
from diffusion_core.types import Model, Progress
from diffusion_core.validation import check_choice, check_int_in_range


@torch.no_grad()
def dpm_solver_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    num_steps: int,
    order: int,
    spacing: str,
    algorithm: str,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    device=None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): the multistep solver of the
    diffusion ODE in its data-prediction form, with ``num_steps`` network evaluations; or, with
    ``algorithm="sde-dpmsolver++"``, its stochastic counterpart for the reverse SDE.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
    the exact solution of the ODE from t_{i-1} to t_i is
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} + alpha_{t_i} int e^{-lambda} x0_hat dlambda;
    with h_i = lambda_{t_i} - lambda_{t_{i-1}} the solver takes

        order 1 (DDIM, eta = 0):  x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) x - alpha_{t_i} (e^{-h_i} - 1) x0_{i-1}
        order 2 (multistep):      the same with D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},
                                  r_i = h_{i-1} / h_i,

    where x0_{i-1} = pred_xstart at t_{i-1} (from eps, x_start, v or score models alike, clamped
    to [-1, 1] when ``clip_denoised``).

    ``algorithm="sde-dpmsolver++"`` (SDE-DPM-Solver++(2M): the same exponential-integrator
    derivation for the reverse diffusion SDE in data-prediction form, by the DPM-Solver authors in
    diffusers' ``DPMSolverMultistepScheduler``, ``algorithm_type="sde-dpmsolver++"``, midpoint form)
    takes, with the same D_i and a fresh z ~ N(0, I) per step,

        x_{t_i} = (sigma_{t_i}/sigma_{t_{i-1}}) e^{-h_i} x + alpha_{t_i} (1 - e^{-2 h_i}) D_i
                  + sigma_{t_i} sqrt(1 - e^{-2 h_i}) z.

    Its first-order step is the posterior q(x_{t_i} | x_{t_{i-1}}, x0_hat) (variance
    sigma_{t_i}^2 (1 - e^{-2 h_i})), i.e. DDIM with eta = 1 on the same timesteps, the ancestral
    step of the respaced chain; order 2 adds the multistep correction of D_i.

    The first step is first order (no earlier x0 yet) and so is the last, "lower order final" as in
    diffusers: it goes to sigma = 0 (lambda = +inf, r = 0), where the first-order step returns
    x0_hat itself.

    Time: the solver's continuous time enters only through lambda, so the steps are taken between
    discrete 0-based timesteps s_0 = T-1 > ... > s_{S-1} (= 0 when S >= 2) of the training schedule
    (:func:`diffusion_core.timesteps.sampling_timesteps`; ``spacing="logsnr"`` is uniform in lambda,
    Lu et al. 2022 sec. 3.4; "uniform" is uniform in t), with alpha, sigma, lambda taken from
    alphas_cumprod at those indices, the model called with exactly those integer timesteps, and a
    final step from s_{S-1} to the data (abar = 1). So S = ``num_steps`` evaluations, and order 1 is
    ``ddim_sample_loop`` (eta = 0) on the same timesteps. Coefficients in float64.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        shape: (N, C, H, W).
        num_steps: S, network evaluations, 1 <= S <= T.
        order: 1 or 2.
        spacing: "logsnr" (the registry's default), "uniform" or "quadratic".
        generator: torch.Generator on ``device`` or ``rng.RowGenerators``; draws x_T (unless
            ``noise`` is given), then, for "sde-dpmsolver++", z of each step but the last, in order.
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp each x0_hat to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each step (0-based index).
        device: defaults to the device of the model's first parameter (cpu for plain callables).
        algorithm: "dpmsolver++" (the ODE, deterministic given x_T) or "sde-dpmsolver++".

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, order, spacing, algorithm, shape/noise or model output shape.
    """
    check_int_in_range("order", order, ORDER.low, ORDER.high)
    check_choice("algorithm", algorithm, DPMAlgorithm)
    steps = sampling_timesteps(process.alphas_cumprod, num_steps, spacing)
    device = resolve_device(model, device)
    x = initial_noise(shape, noise, generator, device)
    abar = process.alphas_cumprod[steps]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    previous_x0, previous_h = None, None
    for i, t_index in enumerate(steps):
        x0, _ = denoise(process, model, x, batch_t(t_index, x.shape[0], device), clip_denoised)
        if i == len(steps) - 1:
            x = x0  # first order to sigma = 0: (0 / sigma) x - 1 * (e^{-inf} - 1) x0
        else:
            h = lam[i + 1] - lam[i]
            if order == 1 or previous_x0 is None:
                d = x0
            else:
                half_inverse_r = float(h / (2.0 * previous_h))  # 1 / (2 r_i), r_i = h_{i-1} / h_i
                d = (1.0 + half_inverse_r) * x0 - half_inverse_r * previous_x0
            if algorithm == "dpmsolver++":
                x = float(sigma[i + 1] / sigma[i]) * x - float(alpha[i + 1] * np.expm1(-h)) * d
            else:
                one_minus = float(-np.expm1(-2.0 * h))  # 1 - e^{-2h}
                x = (float(sigma[i + 1] / sigma[i] * np.exp(-h)) * x + float(alpha[i + 1]) * one_minus * d
                     + float(sigma[i + 1]) * one_minus ** 0.5 * noise_like(x, None, generator))
            previous_h = h
        previous_x0 = x0
        if progress is not None:
            progress(i, len(steps))
    return x
