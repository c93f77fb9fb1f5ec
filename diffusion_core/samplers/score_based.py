"""Samplers that use the model's score: predictor-corrector (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", Alg. 1 with the VP corrector of Alg. 5) and annealed Langevin
dynamics (Song & Ermon 2019, Alg. 1), sharing one Langevin corrector step."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.process import DiffusionProcess
from diffusion_core.samplers.ancestral import ancestral_step
from diffusion_core.samplers.common import batch_t, denoise, initial_noise, resolve_device
from diffusion_core.samplers.ddim import ddim_step
from diffusion_core.samplers.registry import SAMPLERS, SNR
from diffusion_core.timesteps import sampling_timesteps
from diffusion_core.types import Model, Progress
from diffusion_core.validation import check_int_in_range, check_number_in


def langevin_correct(process: DiffusionProcess, model: Model, x: torch.Tensor, t: torch.Tensor, alpha: float,
                     snr: float, generator: rng.Generator) -> torch.Tensor:
    """One Langevin corrector step at the level ``t`` (Song et al. 2021, SDEs, Alg. 5, VP SDE):

        s = score(x, t),  z ~ N(0, I),  eta = 2 alpha (snr ||z|| / ||s||)^2  (per image),
        x <- x + eta s + sqrt(2 eta) z,

    with the norms over C, H, W of each image; eta = 0 for an image whose score is exactly 0.
    ``x`` [N, C, H, W], ``t`` int64 [N] (unchecked); returns the corrected x, same shape and dtype."""
    score = process.score_from_output(model(x, t), x, t)
    z = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    z_norm = z.flatten(1).norm(dim=1)
    s_norm = score.flatten(1).norm(dim=1)
    step = 2.0 * alpha * (snr * z_norm / s_norm) ** 2
    step = torch.where(s_norm > 0, step, torch.zeros_like(step)).reshape(-1, *([1] * (x.ndim - 1)))
    return x + step * score + torch.sqrt(2.0 * step) * z


def _score_levels(process: DiffusionProcess, sampler: str, num_steps: Optional[int], corrector_steps: int,
                  snr: float, spacing: str) -> np.ndarray:
    """Validated noise levels (timesteps, int64 numpy [S]) of the PC and Langevin loops; ``num_steps``
    None is T, and ``corrector_steps`` must be at least ``sampler``'s minimum in the registry."""
    num_steps = process.num_timesteps if num_steps is None else num_steps
    steps = sampling_timesteps(process.alphas_cumprod, num_steps, spacing)
    check_int_in_range("corrector_steps", corrector_steps, SAMPLERS[sampler].min_corrector_steps)
    check_number_in("snr", snr, SNR.low, SNR.high, low_open=SNR.low_open, high_open=SNR.high_open)
    return steps


@torch.no_grad()
def pc_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    num_steps: Optional[int],
    corrector_steps: int,
    snr: float,
    spacing: str,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    device=None,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
    SDEs", Alg. 1 with the VP corrector of Alg. 5): at each of the S = ``num_steps`` levels
    s_0 = T-1 > ... > s_{S-1} (:func:`diffusion_core.timesteps.sampling_timesteps`), first M =
    ``corrector_steps`` Langevin steps at s_i,

        x <- x + eta s + sqrt(2 eta) z,   s = -eps_hat(x, s_i) / sqrt(1 - abar_{s_i})  (Tweedie),
        eta = 2 alpha_{s_i} (snr ||z|| / ||s||)^2 per image,  alpha_t = 1 - beta_t,

    then one ancestral predictor step to s_{i+1} (to x_0 after s_{S-1}, without noise). The
    predictor is the ancestral step of ``p_sample`` (the config's variance) when S = T, and
    otherwise the ancestral step of the respaced chain, DDIM with eta = 1 (Song et al. 2021, DDIM,
    eq. 16: the posterior variance of the chain over the visited timesteps). Correcting before
    predicting, as the reference implementation of Song et al. does, starts with a correction of
    x_T ~ N(0, I) and ends with the predictor's denoising step. M = 0 is the predictor alone (with
    S = T, DDPM and ``p_sample_loop`` exactly: the same draws in the same order).

    The corrector uses the model's raw score (``clip_denoised`` only affects the predictor).
    Cost: S (1 + M) network evaluations.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (any ``prediction``).
        shape: (N, C, H, W).
        num_steps: S, predictor steps, 1 <= S <= T; None: T.
        corrector_steps: M >= 0, Langevin steps per level.
        snr: the signal-to-noise ratio r > 0 of the Langevin step size.
        spacing: "uniform", "quadratic" or "logsnr" (see ``timesteps.py``).
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp the predictor's x0_hat to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each level (0-based index).
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, corrector_steps, snr, spacing, shape/noise or model output shape.
    """
    steps = _score_levels(process, "pc", num_steps, corrector_steps, snr, spacing)
    device = resolve_device(model, device)
    x = initial_noise(shape, noise, generator, device)
    ancestral = len(steps) == process.num_timesteps
    for step, t_index in enumerate(steps):
        t = batch_t(t_index, x.shape[0], device)
        for _ in range(corrector_steps):
            x = langevin_correct(process, model, x, t, float(process.alphas[t_index]), snr, generator)
        if ancestral:
            x = ancestral_step(process, model, x, t, clip_denoised, None, generator, None)["sample"]
        else:
            t_prev_index = int(steps[step + 1]) if step + 1 < len(steps) else -1
            abar_prev = process.alphas_cumprod[t_prev_index] if t_prev_index >= 0 else 1.0
            x = ddim_step(process, model, x, t, process.alphas_cumprod[t_index], abar_prev, 1.0,
                          clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, len(steps))
    return x


@torch.no_grad()
def langevin_sample_loop(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    num_steps: Optional[int],
    corrector_steps: int,
    snr: float,
    spacing: str,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    device=None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the noise levels of the VP
    diffusion: starting from x_T ~ N(0, I), M = ``corrector_steps`` Langevin steps at each of the
    S = ``num_steps`` levels s_0 = T-1 > ... > s_{S-1}, from high noise to low, with the step of
    :func:`pc_sample_loop`'s corrector (Song et al. 2021, SDEs, Alg. 5: eta = 2 alpha_t
    (snr ||z|| / ||s||)^2 per image, s the Tweedie score of the model); no predictor steps.

    Langevin dynamics at a level targets q(x_{s_{S-1}}), a noisy image, not x_0 (the score is not
    defined at alpha_bar = 1), so the loop ends with one denoising evaluation: the result is the
    model's pred_xstart = E[x_0 | x_{s_{S-1}}] at the last level (clamped to [-1, 1] when
    ``clip_denoised``), as Song & Ermon's later "denoising jump" and the score-SDE samplers' final
    mean do. Cost: S M + 1 network evaluations.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (any ``prediction``).
        shape: (N, C, H, W).
        num_steps: S, noise levels, 1 <= S <= T; None: T.
        corrector_steps: M >= 1, Langevin steps per level.
        snr: the Langevin signal-to-noise ratio r > 0.
        spacing: "uniform", "quadratic" or "logsnr" (see ``timesteps.py``).
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp the final pred_xstart to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each level (0-based index).
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, corrector_steps (< 1), snr, spacing, shape/noise or model
            output shape.
    """
    steps = _score_levels(process, "langevin", num_steps, corrector_steps, snr, spacing)
    device = resolve_device(model, device)
    x = initial_noise(shape, noise, generator, device)
    for step, t_index in enumerate(steps):
        t = batch_t(t_index, x.shape[0], device)
        for _ in range(corrector_steps):
            x = langevin_correct(process, model, x, t, float(process.alphas[t_index]), snr, generator)
        if progress is not None:
            progress(step, len(steps))
    pred_xstart, _ = denoise(process, model, x, batch_t(steps[-1], x.shape[0], device), clip_denoised)
    return pred_xstart
