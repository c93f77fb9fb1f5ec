"""Beta schedules of the forward process, computed in float64 numpy.

Two schedules (docs/ARCHITECTURE.md):

* ``"linear"``: betas evenly spaced from ``1e-4 * (1000 / T)`` to ``0.02 * (1000 / T)``
  (Ho et al. 2020, sec. 4; the ``1000 / T`` factor keeps the schedule's overall noise level fixed
  when T changes, as in Nichol & Dhariwal 2021).
* ``"cosine"``: ``alpha_bar(t) = f(t) / f(0)`` with ``f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2``,
  ``s = 0.008``, and ``beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), 0.999)``
  (Nichol & Dhariwal 2021, eq. 17 and sec. 3.2).

Index ``i`` of every array is the 0-based timestep: index 0 is the paper's ``t = 1``.
"""

from __future__ import annotations

import math

import numpy as np

from diffusion_core.validation import check_int_in_range

SCHEDULES = ("linear", "cosine")
COSINE_S = 0.008
MAX_BETA = 0.999


def linear_beta_schedule(num_timesteps: int) -> np.ndarray:
    """Linear betas from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T`` (Ho et al. 2020, sec. 4).

    Args:
        num_timesteps: T >= 2.

    Returns:
        float64 array [T]; for T = 1000 it runs exactly from 1e-4 to 0.02.

    Raises:
        ValueError: if T < 2, or if T is so small (T < 20) that the scaled betas reach 1.
    """
    check_int_in_range("num_timesteps", num_timesteps, 2)
    scale = 1000.0 / num_timesteps
    if 0.02 * scale >= 1.0:
        raise ValueError(
            f"num_timesteps={num_timesteps} is too small for the linear schedule: the last beta "
            f"0.02*1000/T = {0.02 * scale:.3f} must be < 1 (use T >= 21)"
        )
    return np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(tau: np.ndarray | float, s: float = COSINE_S) -> np.ndarray:
    """``f(tau) / f(0)`` with ``f(tau) = cos((tau + s) / (1 + s) * pi / 2) ** 2`` for continuous
    ``tau = t / T`` in [0, 1] (Nichol & Dhariwal 2021, eq. 17). Returns float64."""
    tau = np.asarray(tau, dtype=np.float64)

    def f(x: np.ndarray) -> np.ndarray:
        return np.cos((x + s) / (1.0 + s) * math.pi / 2.0) ** 2

    return f(tau) / f(np.zeros(()))


def cosine_beta_schedule(num_timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
    """Cosine betas ``min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)`` for i = 0..T-1
    (Nichol & Dhariwal 2021, eq. 17, offset s = 0.008, betas capped at 0.999).

    Returns:
        float64 array [T], increasing, each in (0, max_beta].

    Raises:
        ValueError: if T < 2.
    """
    check_int_in_range("num_timesteps", num_timesteps, 2)
    tau = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(tau, s)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """The betas of schedule ``name`` ("linear" | "cosine") for T = ``num_timesteps`` steps.

    Returns:
        float64 numpy array [T]; index 0 is the paper's t = 1.

    Raises:
        ValueError: on an unknown name (lists the allowed ones) or T < 2.
    """
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {list(SCHEDULES)}")
