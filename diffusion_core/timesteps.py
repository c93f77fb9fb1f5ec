"""Which of the T training timesteps a few-step sampler visits (DDIM, DPM-Solver, predictor-corrector,
annealed Langevin): one function, :func:`sampling_timesteps`, shared by all of them; and the noise
levels of Karras et al. 2022 (EDM, eq. 5) for its Heun sampler, :func:`karras_sigmas` and
:func:`karras_timesteps`; and which timesteps training draws under EDM's log-normal noise-level
distribution, :func:`edm_lognormal_probabilities`.

Every choice returns ``num_steps`` = S distinct 0-based timesteps s_0 = T-1 > s_1 > ... > s_{S-1}
(s_{S-1} = 0 when S >= 2) as int64 numpy, so every sampler starts at the last timestep, the level
x_T ~ N(0, I) stands for, and with S = T every choice visits all T timesteps.

* ``"uniform"``: evenly spaced in t, ``rint(linspace(T-1, 0, S))`` (Song et al. 2021, DDIM, sec. 4.2;
  the spacing of :func:`ddim_timesteps`).
* ``"quadratic"``: the quadratic law of Song et al. 2021 (DDIM, appendix D.2, used for CIFAR-10),
  t_i proportional to i^2, so that steps are dense near the data; DDIM's own sequence runs up to
  0.8 T, here it is stretched to end at T-1: s_i = rint((T-1) ((S-1-i)/(S-1))^2).
* ``"logsnr"``: uniform in the half log-SNR lambda_t = log(alpha_t / sigma_t) =
  0.5 log(alpha_bar_t / (1 - alpha_bar_t)) between lambda_{T-1} and lambda_0 (Lu et al. 2022,
  DPM-Solver, sec. 3.4 "uniform logSNR"), each target snapped to the timestep whose lambda is
  nearest by linear interpolation of t in lambda.

Rounding can make neighbouring entries equal where the spacing is below one timestep (near t = 0);
those are spread to consecutive timesteps, keeping both end points (S <= T makes this possible).

The half log-SNR is minus the log of EDM's noise level: lambda_t = -log sigma_t with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise-to-signal ratio of the VP chain (Karras et al.
2022, sec. 2 and appendix C.1: x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps). :func:`karras_timesteps`
snaps the levels of eq. 5 to timesteps exactly as "logsnr" snaps its targets.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_core.samplers.registry import Spacing
from diffusion_core.validation import check_choice, check_int_in_range, check_number_in


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` distinct, evenly spaced timesteps from T-1 down to 0 (0 included when
    num_steps >= 2), as int64 numpy. Raises ValueError unless 1 <= num_steps <= T."""
    check_int_in_range("num_steps", num_steps, 1, num_timesteps)
    return np.rint(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int64)


def _distinct_descending(values: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Rounded timesteps from T-1 down to 0 made strictly decreasing with the same end points."""
    ascending = np.rint(values[::-1]).astype(np.int64)
    ascending[0], ascending[-1] = 0, num_timesteps - 1
    for i in range(1, len(ascending)):
        ascending[i] = max(ascending[i], ascending[i - 1] + 1)
    ascending[-1] = num_timesteps - 1
    for i in range(len(ascending) - 2, -1, -1):
        ascending[i] = min(ascending[i], ascending[i + 1] - 1)
    return ascending[::-1].copy()


def sampling_timesteps(alphas_cumprod: np.ndarray, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """The S = ``num_steps`` timesteps s_0 = T-1 > ... > s_{S-1} a sampler visits, for the schedule
    with ``alphas_cumprod`` (float64 [T]) and the step choice ``spacing`` (see the module docstring).

    Returns:
        int64 numpy [S], strictly decreasing, from T-1 (down to 0 when S >= 2).

    Raises:
        ValueError: unless 1 <= num_steps <= T (an integer), or on a spacing other than
            "uniform", "quadratic", "logsnr".
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    num_timesteps = len(alphas_cumprod)
    check_int_in_range("num_steps", num_steps, 1, num_timesteps)
    check_choice("spacing", spacing, Spacing)
    if spacing == "uniform":
        return ddim_timesteps(num_timesteps, num_steps)
    if num_steps == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    if spacing == "quadratic":
        return _distinct_descending((num_timesteps - 1) * np.linspace(1.0, 0.0, num_steps) ** 2, num_timesteps)
    lambdas = _half_log_snr(alphas_cumprod)
    return _timesteps_at(lambdas, np.linspace(lambdas[-1], lambdas[0], num_steps))  # t from T-1 to 0


def _half_log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda_t = 0.5 log(alpha_bar_t / (1 - alpha_bar_t)) = -log sigma_t, float64 [T], decreasing in t."""
    return 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))


def _timesteps_at(lambdas: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The distinct timesteps (T-1 first, 0 last) nearest the increasing half log-SNR ``targets``: t
    interpolated linearly in lambda between the neighbouring levels, rounded, spread apart where equal."""
    num_timesteps = len(lambdas)
    values = np.interp(targets, lambdas[::-1], np.arange(num_timesteps, dtype=np.float64)[::-1])
    return _distinct_descending(values, num_timesteps)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """The N = ``num_steps`` noise levels of Karras et al. 2022 (EDM), eq. 5, float64 [N]:

        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..N-1,

    from sigma_max down to sigma_min (N = 1: sigma_max alone). The final level sigma_N = 0 of the
    paper is not included.

    Raises:
        ValueError: unless 0 < sigma_min <= sigma_max (finite), num_steps >= 1 and rho > 0.
    """
    check_number_in("sigma_min", sigma_min, 0.0, float("inf"), low_open=True, high_open=True)
    check_number_in("sigma_max", sigma_max, sigma_min, float("inf"), high_open=True)
    check_int_in_range("num_steps", num_steps, 1)
    check_number_in("rho", rho, 0.0, float("inf"), low_open=True, high_open=True)
    if num_steps == 1:
        return np.array([float(sigma_max)])
    high, low = float(sigma_max) ** (1.0 / rho), float(sigma_min) ** (1.0 / rho)
    return (high + np.arange(num_steps, dtype=np.float64) / (num_steps - 1) * (low - high)) ** rho


def karras_timesteps(alphas_cumprod: np.ndarray, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """The S = ``num_steps`` timesteps s_0 = T-1 > ... > s_{S-1} (= 0 when S >= 2) at the noise levels
    of Karras et al. 2022, eq. 5 (:func:`karras_sigmas`), with sigma_min = sigma_0 and sigma_max =
    sigma_{T-1} of the chain (sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)).

    Each level is snapped to a timestep as "logsnr" snaps its targets: t interpolated linearly in
    log sigma between the two neighbouring levels of the chain, rounded to the nearest integer, and
    equal neighbours (where the levels are denser than the timesteps: near t = 0, or near T-1 on a
    chain whose last step jumps, as the cosine schedule's does with its betas capped at 0.999) spread
    to consecutive timesteps.

    Returns:
        int64 numpy [S], strictly decreasing, from T-1 (down to 0 when S >= 2).

    Raises:
        ValueError: unless 1 <= num_steps <= T (an integer) and rho > 0.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    check_int_in_range("num_steps", num_steps, 1, len(alphas_cumprod))
    lambdas = _half_log_snr(alphas_cumprod)
    sigmas = karras_sigmas(float(np.exp(-lambdas[0])), float(np.exp(-lambdas[-1])), num_steps, rho)
    if num_steps == 1:
        return np.array([len(alphas_cumprod) - 1], dtype=np.int64)
    return _timesteps_at(lambdas, -np.log(sigmas))


def log_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """ln sigma_t of the chain, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (so sigma_t^2 = 1 / SNR_t),
    float64 [T], increasing in t."""
    return -_half_log_snr(np.asarray(alphas_cumprod, dtype=np.float64))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    """Phi(z) = erfc(-z / sqrt 2) / 2 elementwise, float64, accurate far into the lower tail."""
    return np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in z], dtype=np.float64)


def edm_lognormal_probabilities(alphas_cumprod: np.ndarray, p_mean: float = -1.2, p_std: float = 1.2) -> np.ndarray:
    """EDM's training distribution of noise levels, ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022,
    "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1 and sec. 5;
    P_mean = -1.2, P_std = 1.2 there), as a distribution over the T timesteps of this chain.

    With l_t = ln sigma_t (:func:`log_sigmas`, increasing in t), timestep t owns the cell of ln sigma
    between the midpoints of its neighbours, e_{t-1/2} = (l_{t-1} + l_t) / 2 and
    e_{t+1/2} = (l_t + l_{t+1}) / 2, with e_{-1/2} = -inf and e_{T-1/2} = +inf (the first and last
    cells are open-ended), and

        p_t = Phi((e_{t+1/2} - P_mean) / P_std) - Phi((e_{t-1/2} - P_mean) / P_std),

    the probability that ln sigma ~ N(P_mean, P_std^2) falls in t's cell: a continuous draw of sigma
    snapped to the timestep whose ln sigma is nearest. Cells above the mean are computed from the
    upper tail (Phi(-a) - Phi(-b)), so tiny masses keep their relative precision.

    Args:
        alphas_cumprod: alpha_bar_t, float64 [T], strictly decreasing in (0, 1).
        p_mean: P_mean, a finite number.
        p_std: P_std, a finite number > 0.

    Returns:
        p, float64 numpy [T], every entry >= 0, summing to 1 (to rounding).

    Raises:
        ValueError: on a bad ``p_mean`` / ``p_std`` (named ``edm_p_mean`` / ``edm_p_std``), fewer
            than 2 timesteps, or ``alphas_cumprod`` not strictly decreasing in (0, 1).
    """
    check_number_in("edm_p_mean", p_mean, -math.inf, math.inf, low_open=True, high_open=True)
    check_number_in("edm_p_std", p_std, 0.0, math.inf, low_open=True, high_open=True)
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with at least 2 timesteps, got shape {alphas_cumprod.shape}")
    if not (np.all(alphas_cumprod > 0) and np.all(alphas_cumprod < 1) and np.all(np.diff(alphas_cumprod) < 0)):
        raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1)")
    levels = log_sigmas(alphas_cumprod)
    edges = np.concatenate(([-np.inf], 0.5 * (levels[:-1] + levels[1:]), [np.inf]))
    z = (edges - float(p_mean)) / float(p_std)
    low, high = z[:-1], z[1:]
    upper = low >= 0.0  # cells wholly above the mean: from the upper tail
    p = np.where(upper, _normal_cdf(-low) - _normal_cdf(-high), _normal_cdf(high) - _normal_cdf(low))
    return p / p.sum()
