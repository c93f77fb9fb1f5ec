"""Samplers: ancestral DDPM (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021, eq. 12),
predictor-corrector and annealed Langevin dynamics with the model's score (Song et al. 2021,
"Score-Based Generative Modeling through SDEs", Alg. 2-5; Song & Ermon 2019), and DPM-Solver++
multistep (Lu et al. 2022). Called through the GaussianDiffusion methods of the same names.

Every sampler runs under ``torch.no_grad()``, draws its noise with
``diffusion_core.rng.randn(..., generator, device=device)`` (so a seeded generator gives the same
images on the same hardware; the generator must live on ``device``; a ``rng.RowGenerators``
gives each group of rows its own generator, and every per-image quantity, such as the Langevin
step size, is computed per row), takes ``noise=`` (the starting x_T [N, C, H, W]) and
``progress=``, and returns float32 [N, C, H, W] (in [-1, 1] when ``clip_denoised``).

Validation: the ``*_sample_loop`` functions check their arguments (shape, noise, num_steps, ...) once
at entry and then run unchecked step functions (``_p_sample``, ``_ddim_step``, ...) on the
timesteps they build themselves: checking a timestep tensor reads ``t.min()``/``t.max()``, which
waits for the device at every step. The public single-step functions (``p_sample``, ``ddim_sample``)
check their inputs on every call.

Cost in network evaluations (model calls on the whole batch) of one loop, S = ``num_steps``,
M = ``corrector_steps`` (see :func:`network_evaluations`): DDPM T, DDIM S, DPM-Solver S,
predictor-corrector S (1 + M), annealed Langevin S M + 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.timesteps import ddim_timesteps as ddim_timesteps  # re-exported: the uniform spacing
from diffusion_core.timesteps import sampling_timesteps
from diffusion_core.types import DenoisedFn, Model, Progress
from diffusion_core.validation import (
    check_choice,
    check_images,
    check_int_in_range,
    check_model_output,
    check_number_in,
    check_same_shape,
)

if TYPE_CHECKING:
    from diffusion_core.diffusion import GaussianDiffusion

Sampler = Literal["ddpm", "ddim", "pc", "langevin", "dpm_solver"]
DPMAlgorithm = Literal["dpmsolver++", "sde-dpmsolver++"]
"""DPM-Solver++'s two forms (diffusers' ``algorithm_type`` names): the ODE, and the reverse SDE."""


def network_evaluations(sampler: str, num_steps: int, corrector_steps: int = 0) -> int:
    """Network evaluations (model calls, each on the whole batch) of one sampling loop.

    Args:
        sampler: "ddpm" (``num_steps`` = T), "ddim", "dpm_solver" (``num_steps``), "pc"
            (``num_steps * (1 + corrector_steps)``: one predictor and M corrector evaluations per
            level) or "langevin" (``num_steps * corrector_steps + 1``: the last one denoises).
        num_steps: S >= 1.
        corrector_steps: M >= 0 (only "pc" and "langevin" use it).

    Raises:
        ValueError: on an unknown sampler or a bad num_steps / corrector_steps.
    """
    check_choice("sampler", sampler, Sampler)
    check_int_in_range("num_steps", num_steps, 1)
    check_int_in_range("corrector_steps", corrector_steps, 0)
    if sampler == "pc":
        return num_steps * (1 + corrector_steps)
    if sampler == "langevin":
        return num_steps * corrector_steps + 1
    return num_steps


def model_device(model: Model) -> torch.device:
    """The device of the model's first parameter; cpu for plain callables or parameterless modules."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def _resolve_device(model: Model, device) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


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


def _batch_t(index: int, n: int, device) -> torch.Tensor:
    """The timestep tensor [n] int64 holding ``index`` for every image."""
    return torch.full((n,), int(index), dtype=torch.long, device=device)


def _check_eta(eta) -> None:
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} must be >= 0")


def _check_snr(snr) -> None:
    check_number_in("snr", snr, 0.0, math.inf, low_open=True, high_open=True)


def _denoise(diffusion: "GaussianDiffusion", model: Model, x: torch.Tensor, t: torch.Tensor,
             clip_denoised: bool, denoised_fn: DenoisedFn = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred_xstart, pred_eps) [N, C, H, W] of the model at (x, t), unchecked but for the output shape."""
    output = model(x, t)
    check_model_output(output, x, diffusion.config.learn_sigma)
    return diffusion._denoise_from_output(output[:, : x.shape[1]], x, t, clip_denoised, denoised_fn)


# ---------------------------------------------------------------------------------------- DDPM
def _p_sample(diffusion, model, x, t, clip_denoised, denoised_fn, generator, noise) -> dict[str, torch.Tensor]:
    """:func:`p_sample` without the (x, t) checks."""
    out = diffusion._p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
    z = _noise_like(x, noise, generator)
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * z
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def p_sample(
    diffusion: "GaussianDiffusion",
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
    diffusion.check_inputs(x, t)
    return _p_sample(diffusion, model, x, t, clip_denoised, denoised_fn, generator, noise)


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
    device = _resolve_device(model, device)
    x = _initial_noise(shape, noise, generator, device)
    total = diffusion.num_timesteps
    for step, t_index in enumerate(range(total - 1, -1, -1)):
        t = _batch_t(t_index, x.shape[0], device)
        x = _p_sample(diffusion, model, x, t, clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, total)
    return x


# ---------------------------------------------------------------------------------------- DDIM
def _check_t_prev(t_prev: torch.Tensor, t: torch.Tensor) -> None:
    """Require integer t_prev [N] with -1 <= t_prev < t elementwise."""
    if not isinstance(t_prev, torch.Tensor) or t_prev.shape != t.shape or t_prev.is_floating_point():
        raise ValueError(f"t_prev must be an int64 tensor of shape {tuple(t.shape)} like t, got {t_prev!r}")
    if bool((t_prev < -1).any()) or bool((t_prev >= t.to(t_prev.device)).any()):
        raise ValueError(
            f"t_prev must satisfy -1 <= t_prev < t for every image (DDIM steps go backwards; -1 means x_0), "
            f"got t_prev={t_prev.tolist()} for t={t.tolist()}"
        )


def _coef(values, like: torch.Tensor):
    """A float64 coefficient as a multiplier of ``like``: a Python float for one value shared by the
    batch (no host-to-device copy), else a tensor [N, 1, 1, 1] in ``like``'s dtype."""
    if np.ndim(values) == 0:
        return float(values)
    return torch.from_numpy(np.asarray(values)).to(device=like.device, dtype=like.dtype).reshape(
        -1, *([1] * (like.ndim - 1))
    )


def _ddim_step(diffusion, model, x, t, abar, abar_prev, eta, clip_denoised, denoised_fn, generator, noise):
    """:func:`ddim_sample` without checks; ``abar``/``abar_prev`` are alpha_bar at t and t_prev
    (float64 scalars shared by the batch, or numpy [N])."""
    pred_xstart, pred_eps = _denoise(diffusion, model, x, t, clip_denoised, denoised_fn)
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)
    direction = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0))
    sample = _coef(np.sqrt(abar_prev), x) * pred_xstart + _coef(direction, x) * pred_eps
    if eta > 0:
        sample = sample + _coef(sigma, x) * _noise_like(x, noise, generator)
    return {"sample": sample, "pred_xstart": pred_xstart}


@torch.no_grad()
def ddim_sample(
    diffusion: "GaussianDiffusion",
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
    _check_eta(eta)
    diffusion.check_inputs(x, t)
    _check_t_prev(t_prev, t)
    abar = diffusion.alphas_cumprod[t.cpu().numpy()]
    abar_prev = np.append(diffusion.alphas_cumprod, 1.0)[t_prev.cpu().numpy()]  # index -1 -> 1.0
    return _ddim_step(diffusion, model, x, t, abar, abar_prev, eta, clip_denoised, denoised_fn, generator, noise)


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
    spacing: str = "uniform",
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``num_steps`` timesteps
    s_0 = T-1 > ... > s_{n-1} = 0 chosen by ``spacing`` (:func:`diffusion_core.timesteps.sampling_timesteps`:
    "uniform", "quadratic" or "logsnr"); step i goes from s_i to s_{i+1} and the last one from
    s_{n-1} to x_0 (alpha_bar = 1). ``num_steps`` model calls.

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
        spacing: the step choice, "uniform" (evenly spaced in t, :func:`ddim_timesteps`),
            "quadratic" or "logsnr".

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, eta, spacing, shape/noise or model output shape.
    """
    _check_eta(eta)
    steps = sampling_timesteps(diffusion.alphas_cumprod, num_steps, spacing)
    device = _resolve_device(model, device)
    x = _initial_noise(shape, noise, generator, device)
    for step, t_index in enumerate(steps):
        t_prev_index = int(steps[step + 1]) if step + 1 < len(steps) else -1
        abar = diffusion.alphas_cumprod[t_index]
        abar_prev = diffusion.alphas_cumprod[t_prev_index] if t_prev_index >= 0 else 1.0
        t = _batch_t(t_index, x.shape[0], device)
        x = _ddim_step(diffusion, model, x, t, abar, abar_prev, eta, clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, len(steps))
    return x


# ------------------------------------------------------------------- score-based: PC and Langevin
def _langevin_correct(diffusion, model, x: torch.Tensor, t: torch.Tensor, alpha: float, snr: float,
                      generator) -> torch.Tensor:
    """One Langevin corrector step at the level ``t`` (Song et al. 2021, SDEs, Alg. 5, VP SDE):

        s = score(x, t),  z ~ N(0, I),  eta = 2 alpha (snr ||z|| / ||s||)^2  (per image),
        x <- x + eta s + sqrt(2 eta) z,

    with the norms over C, H, W of each image; eta = 0 for an image whose score is exactly 0."""
    score = diffusion._score_from_output(model(x, t), x, t)
    z = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    z_norm = z.flatten(1).norm(dim=1)
    s_norm = score.flatten(1).norm(dim=1)
    step = 2.0 * alpha * (snr * z_norm / s_norm) ** 2
    step = torch.where(s_norm > 0, step, torch.zeros_like(step)).reshape(-1, *([1] * (x.ndim - 1)))
    return x + step * score + torch.sqrt(2.0 * step) * z


def _score_levels(diffusion, num_steps, corrector_steps, min_corrector_steps, snr, spacing):
    """Validated noise levels (timesteps) of the PC and Langevin loops."""
    num_steps = diffusion.num_timesteps if num_steps is None else num_steps
    steps = sampling_timesteps(diffusion.alphas_cumprod, num_steps, spacing)
    check_int_in_range("corrector_steps", corrector_steps, min_corrector_steps)
    _check_snr(snr)
    return steps


@torch.no_grad()
def pc_sample_loop(
    diffusion: "GaussianDiffusion",
    model: Model,
    shape: Sequence[int],
    num_steps: Optional[int] = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    spacing: str = "uniform",
    device=None,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
    SDEs", Alg. 1 with the VP corrector of Alg. 5): at each of the S = ``num_steps`` levels
    s_0 = T-1 > ... > s_{S-1} (:func:`diffusion_core.timesteps.sampling_timesteps`), first M =
    ``corrector_steps`` Langevin steps at s_i,

        x <- x + eta s + sqrt(2 eta) z,   s = -eps_hat(x, s_i) / sqrt(1 - abar_{s_i})  (Tweedie),
        eta = 2 alpha_{s_i} (snr ||z|| / ||s||)^2 per image,  alpha_t = 1 - beta_t,

    then one ancestral predictor step to s_{i+1} (to x_0 after s_{S-1}, without noise). The
    predictor is :func:`p_sample` (the config's variance) when S = T, and otherwise the ancestral
    step of the respaced chain, DDIM with eta = 1 (Song et al. 2021, DDIM, eq. 16: the posterior
    variance of the chain over the visited timesteps). Correcting before predicting, as the
    reference implementation of Song et al. does, starts with a correction of x_T ~ N(0, I) and
    ends with the predictor's denoising step. M = 0 is the predictor alone (with S = T, DDPM and
    :func:`p_sample_loop` exactly: the same draws in the same order).

    The corrector uses the model's raw score (``clip_denoised`` only affects the predictor).
    Cost: S (1 + M) network evaluations.

    Args:
        diffusion: the GaussianDiffusion.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (any ``prediction``).
        shape: (N, C, H, W).
        num_steps: S, predictor steps, 1 <= S <= T; None: T.
        corrector_steps: M >= 0, Langevin steps per level.
        snr: the signal-to-noise ratio r > 0 of the Langevin step size (0.16 in Song et al. 2021
            for CIFAR-10 with the VP SDE).
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp the predictor's x0_hat to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each level (0-based index).
        spacing: "uniform", "quadratic" or "logsnr" (see ``timesteps.py``).
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, corrector_steps, snr, spacing, shape/noise or model output shape.
    """
    steps = _score_levels(diffusion, num_steps, corrector_steps, 0, snr, spacing)
    device = _resolve_device(model, device)
    x = _initial_noise(shape, noise, generator, device)
    ancestral = len(steps) == diffusion.num_timesteps
    for step, t_index in enumerate(steps):
        t = _batch_t(t_index, x.shape[0], device)
        for _ in range(corrector_steps):
            x = _langevin_correct(diffusion, model, x, t, float(diffusion.alphas[t_index]), snr, generator)
        if ancestral:
            x = _p_sample(diffusion, model, x, t, clip_denoised, None, generator, None)["sample"]
        else:
            t_prev_index = int(steps[step + 1]) if step + 1 < len(steps) else -1
            abar_prev = diffusion.alphas_cumprod[t_prev_index] if t_prev_index >= 0 else 1.0
            x = _ddim_step(diffusion, model, x, t, diffusion.alphas_cumprod[t_index], abar_prev, 1.0,
                           clip_denoised, None, generator, None)["sample"]
        if progress is not None:
            progress(step, len(steps))
    return x


@torch.no_grad()
def langevin_sample_loop(
    diffusion: "GaussianDiffusion",
    model: Model,
    shape: Sequence[int],
    num_steps: Optional[int] = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    spacing: str = "uniform",
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
        diffusion: the GaussianDiffusion.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (any ``prediction``).
        shape: (N, C, H, W).
        num_steps: S, noise levels, 1 <= S <= T; None: T.
        corrector_steps: M >= 1, Langevin steps per level.
        snr: the Langevin signal-to-noise ratio r > 0.
        generator: torch.Generator on ``device``, or ``rng.RowGenerators`` (one per group of rows).
        noise: optional starting x_T [N, C, H, W].
        clip_denoised: clamp the final pred_xstart to [-1, 1].
        progress: optional ``progress(step_index, S)`` after each level (0-based index).
        spacing: "uniform", "quadratic" or "logsnr" (see ``timesteps.py``).
        device: defaults to the device of the model's first parameter (cpu for plain callables).

    Returns:
        float32 [N, C, H, W] samples.

    Raises:
        ValueError: on a bad num_steps, corrector_steps (< 1), snr, spacing, shape/noise or model
            output shape.
    """
    steps = _score_levels(diffusion, num_steps, corrector_steps, 1, snr, spacing)
    device = _resolve_device(model, device)
    x = _initial_noise(shape, noise, generator, device)
    for step, t_index in enumerate(steps):
        t = _batch_t(t_index, x.shape[0], device)
        for _ in range(corrector_steps):
            x = _langevin_correct(diffusion, model, x, t, float(diffusion.alphas[t_index]), snr, generator)
        if progress is not None:
            progress(step, len(steps))
    pred_xstart, _ = _denoise(diffusion, model, x, _batch_t(steps[-1], x.shape[0], device), clip_denoised)
    return pred_xstart


# ------------------------------------------------------------------------------------ DPM-Solver
@torch.no_grad()
def dpm_solver_sample_loop(
    diffusion: "GaussianDiffusion",
    model: Model,
    shape: Sequence[int],
    num_steps: int = 20,
    order: int = 2,
    spacing: str = "logsnr",
    generator: rng.Generator = None,
    noise: Optional[torch.Tensor] = None,
    clip_denoised: bool = True,
    progress: Progress = None,
    device=None,
    algorithm: str = "dpmsolver++",
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
    :func:`ddim_sample_loop` (eta = 0) on the same timesteps. Coefficients in float64.

    Args:
        diffusion: the GaussianDiffusion.
        model: callable (x_t, t) -> [N, C or 2C, H, W].
        shape: (N, C, H, W).
        num_steps: S, network evaluations, 1 <= S <= T.
        order: 1 or 2.
        spacing: "logsnr" (default), "uniform" or "quadratic".
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
    check_int_in_range("order", order, 1, 2)
    check_choice("algorithm", algorithm, DPMAlgorithm)
    steps = sampling_timesteps(diffusion.alphas_cumprod, num_steps, spacing)
    device = _resolve_device(model, device)
    x = _initial_noise(shape, noise, generator, device)
    abar = diffusion.alphas_cumprod[steps]
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    lam = np.log(alpha) - np.log(sigma)
    previous_x0, previous_h = None, None
    for i, t_index in enumerate(steps):
        x0, _ = _denoise(diffusion, model, x, _batch_t(t_index, x.shape[0], device), clip_denoised)
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
                     + float(sigma[i + 1]) * one_minus ** 0.5 * _noise_like(x, None, generator))
            previous_h = h
        previous_x0 = x0
        if progress is not None:
            progress(i, len(steps))
    return x
