"""Gaussian KL divergences and the discretized Gaussian decoder likelihood of DDPM.

* :func:`normal_kl`: KL between diagonal Gaussians, in nats (used for the bound terms
  L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) of Ho et al. 2020, eq. 5).
* :func:`discretized_gaussian_log_likelihood`: log p(x_0 | x_1) of the decoder L_0 (Ho et al. 2020,
  eq. 13): pixels are the 256 values k/127.5 - 1, each owning the bin of half-width 1/255 around
  it; the bins at -1 and +1 are open-ended.

The exact normal CDF (erfc and ``torch.special.log_ndtr``) is the default; the tanh
approximation used by improved-diffusion is kept as :func:`approx_standard_normal_cdf`.
The bits/dim bound itself lives in ``bound.py``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BIN_HALF_WIDTH = 1.0 / 255.0
LOG_PROB_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats.

    ``0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))``,
    evaluated as ``0.5 * (expm1(d) - d + ...)`` with ``d = logvar1 - logvar2`` (no cancellation).
    Arguments broadcast; at least one must be a torch.Tensor (floats are allowed for the rest).

    Raises:
        TypeError: if none of the arguments is a tensor.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument")
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    diff = logvar1 - logvar2  # exp(d) - 1 - d via expm1: exact 0 for equal variances, no cancellation
    return 0.5 * (torch.expm1(diff) - diff + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast approximation of the standard normal CDF:
    ``0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (the one improved-diffusion uses; max
    absolute error about 1.5e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Exact standard normal CDF Phi(x) = erfc(-x / sqrt(2)) / 2, any shape. (Written with erfc
    rather than ``torch.special.ndtr``, which computes 1 + erf and loses the lower tail: it
    returns 0 below x = -8.3 in float64 and below -5.4 in float32.)"""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def _log_normal_interval(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, accurate in both tails: reflected so the
    interval lies on the lower side (where log Phi is precise), then
    ``log Phi(b) + log(-expm1(log Phi(a) - log Phi(b)))``; the last factor is clamped at the
    dtype's smallest normal number so the log stays finite."""
    above = lower > 0
    a = torch.where(above, -upper, lower)
    b = torch.where(above, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    ratio = -torch.expm1(torch.special.log_ndtr(a) - log_b)
    return log_b + torch.log(ratio.clamp(min=torch.finfo(ratio.dtype).tiny))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    cdf: Literal["exact", "tanh"] = "exact",
) -> torch.Tensor:
    """Log-probability (nats) of each pixel of ``x`` under a Gaussian discretized to 256 bins
    (Ho et al. 2020, eq. 13).

    Bin k covers [x - 1/255, x + 1/255] around x = k/127.5 - 1; the bin of x = -1 extends to
    -inf and the bin of x = +1 to +inf, so the 256 probabilities sum to 1.

    Numerics (exact CDF): the end bins use ``log Phi`` directly (``log_ndtr``, exact in the tails);
    a middle bin's log-probability log(Phi(b) - Phi(a)) is computed in log space on the side of
    the mean where it does not cancel (see ``_log_normal_interval``), so it stays accurate far in
    the tails where improved-diffusion's ``log(max(delta, 1e-12))`` saturates at -27.6, and the
    result and its gradient stay finite. The "tanh" variant reproduces improved-diffusion
    (probabilities clamped at 1e-12 before the log).

    Args:
        x: data [N, C, H, W] (any shape), values on the grid k/127.5 - 1 in [-1, 1].
        means: Gaussian means, broadcastable to x.
        log_scales: log standard deviations (0.5 * log-variance), broadcastable to x.
        cdf: "exact" (default, :func:`standard_normal_cdf` / ``log_ndtr``) or "tanh"
            (:func:`approx_standard_normal_cdf`, for comparison with improved-diffusion).

    Returns:
        log-probabilities in nats, x's shape, all <= 0.

    Raises:
        ValueError: on an unknown ``cdf`` or shapes that do not broadcast to x's shape.
    """
    if cdf not in ("exact", "tanh"):
        raise ValueError(f"cdf={cdf!r} is not allowed; choose 'exact' or 'tanh'")
    try:
        broadcast = torch.broadcast_shapes(x.shape, means.shape, log_scales.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != x.shape:
        raise ValueError(
            f"means {tuple(means.shape)} and log_scales {tuple(log_scales.shape)} must broadcast to x {tuple(x.shape)}"
        )
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    upper = inv_stdv * (centered + BIN_HALF_WIDTH)
    lower = inv_stdv * (centered - BIN_HALF_WIDTH)
    if cdf == "tanh":
        cdf_upper, cdf_lower = approx_standard_normal_cdf(upper), approx_standard_normal_cdf(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=LOG_PROB_FLOOR))
        log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=LOG_PROB_FLOOR))
        log_delta = torch.log((cdf_upper - cdf_lower).clamp(min=LOG_PROB_FLOOR))
    else:
        log_cdf_upper = torch.special.log_ndtr(upper)
        log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
        log_delta = _log_normal_interval(lower, upper)
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta)
    )
