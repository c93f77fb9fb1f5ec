"""Which of the T training timesteps a few-step sampler visits (DDIM, DPM-Solver, predictor-corrector,
annealed Langevin): one function, :func:`sampling_timesteps`, shared by all of them.

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
"""

from __future__ import annotations

import numpy as np

from diffusion_core.samplers.registry import Spacing
from diffusion_core.validation import check_choice, check_int_in_range


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
        values = (num_timesteps - 1) * np.linspace(1.0, 0.0, num_steps) ** 2
    else:
        lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))  # decreasing in t
        targets = np.linspace(lambdas[-1], lambdas[0], num_steps)  # increasing: t from T-1 to 0
        values = np.interp(targets, lambdas[::-1], np.arange(num_timesteps, dtype=np.float64)[::-1])
    return _distinct_descending(values, num_timesteps)
