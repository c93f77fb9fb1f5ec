"""The variational bound of DDPM in bits/dim: its terms, the exact sum over all T terms
(``calc_bpd_loop``) and an unbiased stratified estimate from a few terms (``calc_bpd_estimate``).

The bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eqs. 4-7, 13) for one image x_0 is

    L = L_prior + sum_{t=0}^{T-1} L_t        (0-based t; index t is the paper's t + 1)
    L_prior = KL(q(x_T | x_0) || N(0, I))
    L_t     = E_q KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   for t >= 1
    L_0     = E_q -log p(x_0 | x_1)   (the discretized Gaussian decoder, eq. 13)

Bits/dim = nats / (C * H * W * ln 2). Written on ``diffusion_core.process.DiffusionProcess``; called
through the GaussianDiffusion methods of the same names.

A class-conditional network is passed as ``diffusion_core.guidance.with_class_labels(model, y)``:
the bound is then on -log p(x | y), and with every label -1 on -log p(x). Their difference
estimates the label's information log p(y | x) - log p(y); it is not a bound (both are upper
bounds with unequal gaps), see ``diffusion_core.guidance``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_core import rng
from diffusion_core.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_core.process import DiffusionProcess
from diffusion_core.types import Model, Progress
from diffusion_core.validation import check_images, check_int_in_range, check_same_shape


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats [N, C, H, W] -> bits/dim [N] (mean over C, H, W, divided by ln 2)."""
    return mean_flat(nats) / math.log(2.0)


def vb_terms_bpd(
    process: DiffusionProcess,
    output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = False,
) -> dict[str, torch.Tensor]:
    """The bound term L_t in bits/dim for each image, from the model ``output`` at (x_t, t).

    L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 (Ho et al. eq. 5) and the decoder
    NLL -log p(x_0|x_1) for t = 0 (eq. 13; exact discretized Gaussian, log-scale = half the
    reverse log-variance).

    Args:
        process: the diffusion process.
        output: model output [N, C or 2C, H, W] at (x_t, t).
        x_start: x_0 [N, C, H, W] on the 256-level grid.
        x_t: [N, C, H, W].
        t: int64 [N] in [0, T).
        clip_denoised: clamp pred_xstart to [-1, 1] in p(x_{t-1}|x_t).

    Returns:
        dict "output" [N] (bits/dim of L_t), "pred_xstart" and "pred_eps" [N, C, H, W].

    Raises:
        ValueError: on bad shapes or t outside [0, T).
    """
    process.check_inputs(x_t, t)
    check_same_shape(x_start, x_t, "x_start", "x_t")
    return _vb_terms_bpd(process, output, x_start, x_t, t, clip_denoised)


def _vb_terms_bpd(process, output, x_start, x_t, t, clip_denoised):
    """:func:`vb_terms_bpd` without the (x_t, t) checks (the output shape is still checked)."""
    true_mean, _, true_log_variance = process.q_posterior_mean_variance(x_start, x_t, t)
    out = process.p_mean_variance_from_output(output, x_t, t, clip_denoised=clip_denoised)
    kl = _bits_per_dim(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -_bits_per_dim(
        discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    )
    return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"],
            "pred_eps": out["pred_eps"]}


def prior_bpd(process: DiffusionProcess, x_start: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) in bits/dim, [N] (Ho et al. 2020, eq. 5, L_T).
    Does not depend on the model. Raises ValueError on a bad shape."""
    check_images(x_start, "x_start")
    t = torch.full((x_start.shape[0],), process.num_timesteps - 1, dtype=torch.long, device=x_start.device)
    mean, _, log_variance = process.q_mean_variance(x_start, t)
    return _bits_per_dim(normal_kl(mean, log_variance, 0.0, 0.0))


def _term_with_mse(process, model, x_start, t, clip_denoised, generator):
    """(L_t [N] bits/dim, x0-MSE [N], eps-MSE [N]) for one fresh noise draw per image."""
    noise = rng.randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
    x_t = process.q_sample(x_start, t, noise)  # t is made by the loops, x_start checked at their entry
    terms = _vb_terms_bpd(process, model(x_t, t), x_start, x_t, t, clip_denoised)
    xstart_mse = mean_flat((terms["pred_xstart"] - x_start) ** 2)
    eps_mse = mean_flat((terms["pred_eps"] - noise) ** 2)
    return terms["output"], xstart_mse, eps_mse


@torch.no_grad()
def calc_bpd_loop(
    process: DiffusionProcess,
    model: Model,
    x_start: torch.Tensor,
    clip_denoised: bool = False,
    generator: rng.Generator = None,
    progress: Progress = None,
) -> dict[str, torch.Tensor]:
    """The full variational bound in bits/dim, every term evaluated once (Ho et al. 2020, eq. 5).

    T network calls, each on the whole batch at one timestep (t = T-1 down to 0), each with a
    fresh noise draw x_t ~ q(x_t | x_0) from ``generator``.

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (a conditional network through
            ``guidance.with_class_labels``: the bound on -log p(x | y); labels -1: on -log p(x)).
        x_start: x_0, float32 [N, C, H, W], pixels k/127.5 - 1.
        clip_denoised: clamp pred_xstart to [-1, 1] in every term.
        generator: torch.Generator on x_start's device (same seed -> same result), or a
            ``rng.RowGenerators`` (one generator per group of rows, see ``diffusion_core.rng``).
        progress: optional callback ``progress(step_index, total_steps)`` called after each of
            the T terms with step_index = 0..T-1.

    Returns:
        dict of float32 tensors: "total_bpd" [N] (prior + all terms), "prior_bpd" [N], "vb" [N, T]
        (bits/dim of L_t; column 0 is the decoder term L_0), "xstart_mse" [N, T] and "mse" [N, T]
        (MSE of pred_xstart vs x_0 and of pred_eps vs the noise).

    Raises:
        ValueError: on a bad x_start shape or a model output of the wrong shape.
    """
    check_images(x_start, "x_start")
    n, num_t = x_start.shape[0], process.num_timesteps
    vb = torch.zeros(n, num_t, dtype=torch.float64, device=x_start.device)
    xstart_mse = torch.zeros_like(vb)
    mse = torch.zeros_like(vb)
    for step, t_index in enumerate(range(num_t - 1, -1, -1)):
        t = torch.full((n,), t_index, dtype=torch.long, device=x_start.device)
        vb[:, t_index], xstart_mse[:, t_index], mse[:, t_index] = _term_with_mse(
            process, model, x_start, t, clip_denoised, generator
        )
        if progress is not None:
            progress(step, num_t)
    prior = prior_bpd(process, x_start)
    total = vb.sum(dim=1) + prior.double()
    return {"total_bpd": total.float(), "prior_bpd": prior.float(), "vb": vb.float(),
            "xstart_mse": xstart_mse.float(), "mse": mse.float()}


def strata_bounds(num_timesteps: int, num_strata: int) -> np.ndarray:
    """Boundaries ``b`` [num_strata + 1] (int64, b_0 = 0 < b_1 < ... < b_H = T) of ``num_strata`` = H
    contiguous strata [b_h, b_{h+1}) of the 0-based timesteps [0, T), narrow where the bound's
    terms are large and change fast.

    With H >= 2 the first stratum is {0} alone (the decoder term L_0, the largest single term),
    and [1, T) is cut at 1 + (T - 1) (i / (H - 1))^3, i = 0 .. H-1, rounded and then spread so that
    every stratum holds at least one timestep (H <= T is required). Most of the bound sits in the
    first few terms and L_t falls steeply with t (Ho et al. 2020, sec. 4.2; Nichol & Dhariwal 2021,
    Fig. 2), so equal-width strata waste draws where L_t is flat and leave the few large terms
    to chance (benchmarks/RESULTS.md, "Estimated vs exact bound", has the measured spread). Any partition keeps
    the estimate unbiased.

    Raises:
        ValueError: if not 1 <= num_strata <= num_timesteps.
    """
    if not 1 <= num_strata <= num_timesteps:
        raise ValueError(f"num_strata={num_strata} must be in [1, num_timesteps={num_timesteps}]")
    if num_strata == 1:
        return np.array([0, num_timesteps], dtype=np.int64)
    cuts = 1 + (num_timesteps - 1) * (np.arange(num_strata) / (num_strata - 1)) ** 3
    bounds = np.concatenate([[0], np.rint(cuts)]).astype(np.int64)
    for i in range(1, num_strata + 1):  # at least one timestep per stratum ...
        bounds[i] = max(bounds[i], bounds[i - 1] + 1)
    bounds[num_strata] = num_timesteps
    for i in range(num_strata - 1, 0, -1):  # ... without running past T
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    return bounds


@torch.no_grad()
def calc_bpd_estimate(
    process: DiffusionProcess,
    model: Model,
    x_start: torch.Tensor,
    num_samples: int = 16,
    clip_denoised: bool = False,
    generator: rng.Generator = None,
) -> dict:
    """Unbiased stratified Monte-Carlo estimate of the full bound (bits/dim) with its standard error,
    from K = ``num_samples`` network calls instead of T.

    Design: [0, T) is split into H = K // 2 contiguous strata S_h (:func:`strata_bounds`: {0} alone,
    then strata widening with t); each stratum gets
    n_h = 2 independent draws (the last one 3 when K is odd) of t ~ Uniform(S_h), drawn
    independently per image, each with its own noise. With Y = L_t (bits/dim),

        estimate = L_prior + sum_h |S_h| * mean_j Y_{h,j}                       (unbiased for L)
        stderr^2 = sum_h |S_h|^2 * s_h^2 / n_h,  s_h^2 = sample variance of Y_{h,.} (n_h - 1 dof)

    which is the textbook unbiased variance estimator of a stratified mean (Cochran, "Sampling
    Techniques", eq. 5.7 ff.). Two draws per stratum are used instead of one so that this variance
    estimate is unbiased; one draw per stratum would only allow the collapsed-strata estimator,
    which overstates the variance when L_t trends across strata (as it does near t = 0).
    Each network call evaluates all N images (at per-image timesteps).

    Args:
        process: the diffusion process.
        model: callable (x_t, t) -> [N, C or 2C, H, W] (a conditional network through
            ``guidance.with_class_labels``: the bound on -log p(x | y); labels -1: on -log p(x)).
        x_start: x_0, float32 [N, C, H, W], pixels k/127.5 - 1.
        num_samples: K, number of network calls per image; 2 <= K <= 2T.
        clip_denoised: clamp pred_xstart to [-1, 1] in every term.
        generator: torch.Generator on x_start's device for the timesteps and noise, or a
            ``rng.RowGenerators`` (one generator per group of rows, see ``diffusion_core.rng``).

    Returns:
        dict: "total_bpd" [N] float32 (estimate of prior + sum of all T terms, bits/dim),
        "stderr" [N] float32 (its standard error, bits/dim), "prior_bpd" [N] float32 (exact, L_T),
        "num_samples" (int K), "strata" (int64 numpy [H + 1], the boundaries of
        :func:`strata_bounds`) and "stratum_bpd" [N, H] float32: the unbiased estimate
        ``|S_h| * mean_j Y_{h,j}`` of each stratum's sum of terms L_t, t in S_h (the columns add up
        to total - prior; with H >= 2 column 0 is the decoder term L_0, stratum {0}).

    Raises:
        ValueError: if K is not an integer in [2, 2T], or on bad x_start / model output shapes.
    """
    check_images(x_start, "x_start")
    num_t = process.num_timesteps
    check_int_in_range("num_samples", num_samples, 2, 2 * num_t, " (2 draws per stratum, at most T strata)")
    n, device = x_start.shape[0], x_start.device
    bounds = strata_bounds(num_t, num_samples // 2)
    estimate = torch.zeros(n, dtype=torch.float64, device=device)
    variance = torch.zeros_like(estimate)
    per_stratum = []
    for h in range(len(bounds) - 1):
        start, size = int(bounds[h]), int(bounds[h + 1] - bounds[h])
        draws = 3 if (num_samples % 2 and h == len(bounds) - 2) else 2
        values = []
        for _ in range(draws):
            u = rng.rand((n,), generator, device=device, dtype=torch.float64)
            t = (start + torch.floor(u * size)).long().clamp(max=start + size - 1)
            values.append(_term_with_mse(process, model, x_start, t, clip_denoised, generator)[0].double())
        ys = torch.stack(values, dim=1)
        per_stratum.append(size * ys.mean(dim=1))
        estimate += per_stratum[-1]
        variance += size**2 * ys.var(dim=1, unbiased=True) / draws
    prior = prior_bpd(process, x_start)
    return {"total_bpd": (estimate + prior.double()).float(), "stderr": variance.sqrt().float(),
            "prior_bpd": prior.float(), "num_samples": int(num_samples),
            "strata": bounds, "stratum_bpd": torch.stack(per_stratum, dim=1).float()}
