"""Samplers: ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021,
eq. 12). Called through the GaussianDiffusion methods of the same names.

Every sampler runs under ``torch.no_grad()``, draws its noise with
``diffusion_core.rng.randn(..., generator, device=device)`` (so a seeded generator gives the same
images on the same hardware; the generator must live on ``device``; a ``rng.RowGenerators``
gives each group of rows its own generator), and returns float32 [N, C, H, W] (in [-1, 1] when
``clip_denoised``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.validation import check_images, check_int_in_range, check_same_shape

if TYPE_CHECKING:
    from diffusion_core.diffusion import GaussianDiffusion

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter; cpu for plain callables or parameterless modules."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def _initial_noise(shape: Sequence[int], noise, generator, device) -> torch.Tensor:
    """x_T: ``noise`` if given (checked against ``shape``), else N(0, I) drawn with ``generator``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, H, W) with positive entries, got {shape}")
    if noise is not None:
        check_images(noise, "noise")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape}")
        return noise.to(device=device, dtype=torch.float32)
    return rng.randn(shape, generator, device=device, dtype=torch.float32)


def _noise_like(x: torch.Tensor, noise, generator) -> torch.Tensor:
    if noise is None:
        return rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    check_same_shape(noise, x, "noise", "x")
    return noise


@torch.no_grad()
def p_sample(
    diffusion: "GaussianDiffusion",
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = True,
    denoised_fn=None,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """One ancestral step: x_{t-1} = mean + exp(0.5 log_variance) * z with z ~ N(0, I), and no
    noise where t == 0 (Ho et al. 2020, Algorithm 2, line 4; mean and variance from
    ``p_mean_variance``).

    Args:
        diffusion: the GaussianDiffusion.
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
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
    z = _noise_like(x, noise, generator)
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def p_sample_loop(
    diffusion: "GaussianDiffusion",
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
        diffusion: the GaussianDiffusion.
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
    device = torch.device(device) if device is not None else model_device(model)
    x = _initial_noise(shape, noise, generator, device)
    total = diffusion.num_timesteps
    for step, t_index in enumerate(range(total - 1, -1, -1)):
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=device)
        x = p_sample(diffusion, model, x, t, clip_denoised=clip_denoised, generator=generator)["sample"]
        if progress is not None:
            progress(step, total)
    return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` distinct, evenly spaced timesteps from T-1 down to 0 (0 included when
    num_steps >= 2), as int64 numpy. Raises ValueError unless 1 <= num_steps <= T."""
    check_int_in_range("num_steps", num_steps, 1, num_timesteps)
    return np.rint(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int64)


def _check_t_prev(t_prev: torch.Tensor, t: torch.Tensor) -> None:
    """Require integer t_prev [N] with -1 <= t_prev < t elementwise."""
    if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape or t_prev.is_floating_point():
        raise ValueError(f"t_prev must be an int64 tensor of shape {tuple(t.shape)} like t, got {t_prev!r}")
    if bool((t_prev < -1).any()) or bool((t_prev >= t.to(t_prev.device)).any()):
        raise ValueError(
            f"t_prev must satisfy -1 <= t_prev < t for every image (DDIM steps go backwards; -1 means x_0), "
            f"got t_prev={t_prev.tolist()} for t={t.tolist()}"
        )


@torch.no_grad()
def ddim_sample(
    diffusion: "GaussianDiffusion",
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    eta: float = 0.0,
    clip_denoised: bool = True,
    denoised_fn=None,
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
        diffusion: the GaussianDiffusion.
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
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0")
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
    _check_t_prev(t_prev, t)
    abar = diffusion.alphas_cumprod[t.cpu().numpy()]
    abar_prev = np.append(diffusion.alphas_cumprod, 1.0)[t_prev.cpu().numpy()]  # index -1 -> 1.0
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)
    direction = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))

    def coef(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    sample = coef(np.sqrt(abar_prev)) * out["pred_xstart"] + coef(direction) * out["pred_eps"]
    if eta > 0:
        sample = sample + coef(sigma) * _noise_like(x, noise, generator)
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def ddim_sample_loop(
    diffusion: "GaussianDiffusion",
    model: Model,
    shape: Sequence[int],
    num_steps: int = 50,
    eta: float = 0.0,
    generator: rng.Generator = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    noise: Optional[torch.Tensor] = None,
    device=None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``num_steps`` evenly spaced timesteps
    s_0 = T-1 > ... > s_{n-1} = 0 (see :func:`ddim_timesteps`); step i goes from s_i to s_{i+1}
    and the last one from s_{n-1} to x_0 (alpha_bar = 1). ``num_steps`` model calls.

    Args:
        diffusion: the GaussianDiffusion.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        shape: (N, C, H, W).
        num_steps: number of steps, 1 <= num_steps <= T.
        eta: 0 for deterministic DDIM, 1 for DDPM-like noise.
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        clip_denoised: clamp x0_hat to [-1, 1] each step.
        progress: optional ``progress(step_index, total_steps)`` after each step (0-based index).
        noise: optional starting x_T [N, C, H, W].
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, eta, shape/noise or model output shape.
    """
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0")
    steps = ddim_timesteps(diffusion.num_timesteps, num_steps)
    device = torch.device(device) if device is not None else model_device(model)
    x = _initial_noise(shape, noise, generator, device)
    n = x.shape[0]
    for step, t_index in enumerate(steps):
        t_prev_index = int(steps[step + 1]) if step + 1 < len(steps) else -1
        t = torch.full((n,), int(t_index), dtype=torch.long, device=device)
        t_prev = torch.full((n,), t_prev_index, dtype=torch.long, device=device)
        x = ddim_sample(diffusion, model, x, t, t_prev, eta, clip_denoised, generator=generator)["sample"]
        if progress is not None:
            progress(step, len(steps))
    return x
