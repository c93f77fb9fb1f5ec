"""Step helpers every sampling loop shares: the device, the starting noise x_T, the per-step noise,
the timestep tensor of a step, a float64 coefficient as a multiplier, one denoising evaluation of
the model, and the checked cost of a loop in network evaluations."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.registry import SAMPLERS, SamplerName
from diffusion_core.types import DenoisedFn, Model
from diffusion_core.validation import (
    check_choice,
    check_images,
    check_int_in_range,
    check_model_output,
    check_same_shape,
)


def network_evaluations(sampler: str, num_steps: int, corrector_steps: int = 0) -> int:
    """Network evaluations (model calls, each on the whole batch) of one sampling loop:
    the registry's cost of ``sampler`` (``diffusion_core.samplers.registry``) with S = ``num_steps``
    and M = ``corrector_steps``; for "ddpm" ``num_steps`` is the T it visits.

    Args:
        sampler: a name of the registry: "ddpm" (``num_steps`` = T), "ddim", "dpm_solver"
            (``num_steps``), "pc" (``num_steps * (1 + corrector_steps)``), "langevin"
            (``num_steps * corrector_steps + 1``: the last one denoises) or "edm_heun"
            (``2 * num_steps - 1``: two per Heun step, one for the last).
        num_steps: S >= 1.
        corrector_steps: M >= 0 (only "pc" and "langevin" use it).

    Raises:
        ValueError: on an unknown sampler or a bad num_steps / corrector_steps.
    """
    check_choice("sampler", sampler, SamplerName)
    check_int_in_range("num_steps", num_steps, 1)
    check_int_in_range("corrector_steps", corrector_steps, 0)
    return SAMPLERS[sampler].cost(num_steps, corrector_steps, num_steps)


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter; cpu for plain callables or parameterless modules."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def resolve_device(model: Model, device) -> torch.device:
    """``device`` as a ``torch.device``, or the model's (:func:`model_device`) when it is None."""
    return torch.device(device) if device is not None else model_device(model)


def initial_noise(shape: Sequence[int], noise, generator: rng.Generator, device) -> torch.Tensor:
    """x_T, float32 [N, C, H, W] on ``device``: ``noise`` if given (checked against ``shape``),
    else N(0, I) drawn with ``generator``.

    Raises:
        ValueError: if ``shape`` is not four positive sizes, or ``noise`` is not images of that shape.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, H, W) with positive entries, got {shape}")
    if noise is not None:
        check_images(noise, "noise")
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape}")
        return noise.to(device=device, dtype=torch.float32)
    return rng.randn(shape, generator, device=device, dtype=torch.float32)


def noise_like(x: torch.Tensor, noise: Optional[torch.Tensor], generator: rng.Generator) -> torch.Tensor:
    """The noise z of one step, x's shape, dtype and device: ``noise`` if given (shape checked), else
    N(0, I) drawn with ``generator``. Raises ValueError on a shape different from x's."""
    if noise is None:
        return rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    check_same_shape(noise, x, "noise", "x")
    return noise


def batch_t(index: int, n: int, device) -> torch.Tensor:
    """The timestep tensor [n] int64 holding the 0-based ``index`` for every image."""
    return torch.full((n,), int(index), dtype=torch.long, device=device)


def coef(values, like: torch.Tensor):
    """A float64 coefficient as a multiplier of ``like``: a Python float for one value shared by the
    batch (no host-to-device copy), else a tensor [N, 1, 1, 1] in ``like``'s dtype."""
    if np.ndim(values) == 0:
        return float(values)
    return torch.from_numpy(np.asarray(values)).to(device=like.device, dtype=like.dtype).reshape(
        -1, *([1] * (like.ndim - 1))
    )


def denoise(process: DiffusionProcess, model: Model, x: torch.Tensor, t: torch.Tensor,
            clip_denoised: bool, denoised_fn: DenoisedFn = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred_xstart, pred_eps) [N, C, H, W] of one model call at (x, t) (``process.denoise_from_output``);
    (x, t) unchecked, the output's shape checked (ValueError)."""
    output = model(x, t)
    check_model_output(output, x, process.config.learn_sigma)
    return process.denoise_from_output(output[:, : x.shape[1]], x, t, clip_denoised, denoised_fn)
