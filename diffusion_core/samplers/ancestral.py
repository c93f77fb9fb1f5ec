"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2): one step and the loop over all T timesteps."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.common import batch_t, initial_noise, noise_like, resolve_device
from diffusion_core.types import DenoisedFn, Model, Progress


def ancestral_step(process: DiffusionProcess, model: Model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool,
                   denoised_fn: DenoisedFn, generator: rng.Generator,
                   noise: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`p_sample` without the (x, t) checks, for loops that build their own timesteps."""
    out = process.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
    z = noise_like(x, noise, generator)
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def p_sample(
    process: DiffusionProcess,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = True,
    denoised_fn: DenoisedFn = None,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """One ancestral step: x_{t-1} = mean + exp(0.5 log_variance) * z with z ~ N(0, I), and no
    noise where t == 0 (Ho et al. 2020, Algorithm 2, line 4; mean and variance from
    ``p_mean_variance``).

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        x: x_t, float [N, C, H, W].
        t: int64 [N], 0-based timesteps in [0, T).
        clip_denoised: clamp pred_xstart to [-1, 1].
        denoised_fn: optional map applied to pred_xstart.
        generator: torch.Generator (on x's device) or ``rng.RowGenerators`` for z; z is drawn
            even where t == 0.
        noise: z itself [N, C, H, W], instead of drawing it.

    Returns:
        dict "sample" (x_{t-1}) and "pred_xstart", each [N, C, H, W].

    Raises:
        ValueError: on bad shapes, t outside [0, T), or a wrong model output shape.
    """
    process.check_inputs(x, t)
    return ancestral_step(process, model, x, t, clip_denoised, denoised_fn, generator, noise)


@torch.no_grad()
def p_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    generator: rng.Generator = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    noise: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """Ancestral DDPM sampling from x_{T-1} ~ N(0, I) down to x_0 (Ho et al. 2020, Algorithm 2):
    T model calls, t = T-1, ..., 0, the last one without added noise.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        shape: (N, C, H, W) of the images.
        generator: torch.Generator on ``device`` (same seed -> same images on the same hardware),
            or ``rng.RowGenerators`` (one generator per group of rows).
        clip_denoised: clamp pred_xstart to [-1, 1] at every step (the output is then in [-1, 1]).
        progress: optional callback ``progress(step_index, total_steps)`` called after each step,
            step_index = 0..T-1.
        noise: optional starting noise x_T [N, C, H, W] instead of drawing it.
        device: where to sample; defaults to the device of the model's first parameter (cpu for
            plain callables).

    Returns:
        float32 [N, C, H, W] samples x_0.

    Raises:
        ValueError: on a bad shape/noise or a wrong model output shape.
    """
    device = resolve_device(model, device)
    x = initial_noise(shape, noise, generator, device)
    total = process.num_timesteps
    for step, t_index in enumerate(range(total - 1, -1, -1)):
        t = batch_t(t_index, x.shape[0], device)
        x = ancestral_step(process, model, x, t, clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, total)
    return x
