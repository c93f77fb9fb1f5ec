"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): one step between any two
timesteps, and the loop over S timesteps chosen by a spacing."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.common import batch_t, coef, denoise, initial_noise, noise_like, resolve_device
from diffusion_core.samplers.registry import ETA
from diffusion_core.timesteps import sampling_timesteps
from diffusion_core.types import DenoisedFn, Model, Progress
from diffusion_core.validation import check_number_in


def check_eta(eta) -> None:
    """Require DDIM's ``eta`` in the registry's range, [0, inf). Raises ValueError naming it."""
    check_number_in("eta", eta, ETA.low, ETA.high, low_open=ETA.low_open, high_open=ETA.high_open)


def _check_t_prev(t_prev: torch.Tensor, t: torch.Tensor) -> None:
    """Require integer t_prev [N] with -1 <= t_prev < t elementwise."""
    if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape or t_prev.is_floating_point():
        raise ValueError(f"t_prev must be an int64 tensor of shape {tuple(t.shape)} like t, got {t_prev!r}")
    if bool((t_prev < -1).any()) or bool((t_prev >= t.to(t_prev.device)).any()):
        raise ValueError(
            f"t_prev must satisfy -1 <= t_prev < t for every image (DDIM steps go backwards; -1 means x_0), "
            f"got t_prev={t_prev.tolist()} for t={t.tolist()}"
        )


def ddim_step(process: DiffusionProcess, model: Model, x: torch.Tensor, t: torch.Tensor, abar, abar_prev,
              eta: float, clip_denoised: bool, denoised_fn: DenoisedFn, generator: rng.Generator,
              noise: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`ddim_sample` without checks; ``abar``/``abar_prev`` are alpha_bar at t and t_prev
    (float64 scalars shared by the batch, or numpy [N])."""
    pred_xstart, pred_eps = denoise(process, model, x, t, clip_denoised, denoised_fn)
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)
    direction = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))
    sample = coef(np.sqrt(abar_prev), x) * pred_xstart + coef(direction, x) * pred_eps
    if eta > 0:
        sample = sample + coef(sigma, x) * noise_like(x, noise, generator)
    return {"sample": sample, "pred_xstart": pred_xstart}


@torch.no_grad()
def ddim_sample(
    process: DiffusionProcess,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: float = 0.0,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn = None,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12):

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
        sigma  = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev),

    with x0_hat, eps_hat from ``p_mean_variance`` (eps_hat recomputed from the clipped x0_hat when
    ``clip_denoised``) and abar_prev = 1 where t_prev == -1 (the final step to x_0). eta = 0 is
    deterministic DDIM; eta = 1 with t_prev = t - 1 is DDPM with the fixed_small variance.
    Coefficients are computed in float64 and cast to x's dtype.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        x: x_t, float [N, C, H, W].
        t: int64 [N] in [0, T).
        t_prev: int64 [N] in [-1, t) (-1: go to x_0).
        eta: >= 0, the stochasticity.
        clip_denoised: clamp x0_hat to [-1, 1].
        denoised_fn: optional map applied to x0_hat.
        generator: torch.Generator or ``rng.RowGenerators`` for z (drawn only when eta > 0).
        noise: z itself [N, C, H, W], instead of drawing it.

    Returns:
        dict "sample" (x_{t_prev}) and "pred_xstart", each [N, C, H, W].

    Raises:
        ValueError: on bad shapes, t outside [0, T), t_prev outside [-1, t), eta < 0, or a wrong
            model output shape.
    """
    check_eta(eta)
    process.check_inputs(x, t)
    _check_t_prev(t_prev, t)
    abar = process.alphas_cumprod[t.cpu().numpy()]
    abar_prev = np.append(process.alphas_cumprod, 1.0)[t_prev.cpu().numpy()]  # index -1 -> 1.0
    return ddim_step(process, model, x, t, abar, abar_prev, eta, clip_denoised, denoised_fn, generator, noise)


@torch.no_grad()
def ddim_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    num_steps: int,
    eta: float,
    spacing: str,
    generator: rng.Generator = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    noise: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``num_steps`` timesteps
    s_0 = T-1 > ... > s_{n-1} = 0 chosen by ``spacing`` (:func:`diffusion_core.timesteps.sampling_timesteps`:
    "uniform", "quadratic" or "logsnr"); step i goes from s_i to s_{i+1} and the last one from
    s_{n-1} to x_0 (alpha_bar = 1). ``num_steps`` model calls.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        shape: (N, C, H, W).
        num_steps: number of steps, 1 <= num_steps <= T.
        eta: 0 for deterministic DDIM, 1 for DDPM-like noise.
        spacing: the step choice, "uniform" (evenly spaced in t, ``timesteps.ddim_timesteps``),
            "quadratic" or "logsnr".
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        clip_denoised: clamp x0_hat to [-1, 1] each step.
        progress: optional ``progress(step_index, total_steps)`` after each step (0-based index).
        noise: optional starting x_T [N, C, H, W].
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, eta, spacing, shape/noise or model output shape.
    """
    check_eta(eta)
    steps = sampling_timesteps(process.alphas_cumprod, num_steps, spacing)
    device = resolve_device(model, device)
    x = initial_noise(shape, noise, generator, device)
    for step, t_index in enumerate(steps):
        t_prev_index = int(steps[step + 1]) if step + 1 < len(steps) else -1
        abar = process.alphas_cumprod[t_index]
        abar_prev = process.alphas_cumprod[t_prev_index] if t_prev_index >= 0 else 1.0
        t = batch_t(t_index, x.shape[0], device)
        x = ddim_step(process, model, x, t, abar, abar_prev, eta, clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, len(steps))
    return x
