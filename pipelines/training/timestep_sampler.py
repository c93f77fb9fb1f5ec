"""Which timesteps a training step draws: uniformly, or by importance sampling on the loss's second
moment (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", sec. 3.3).

With the ``vlb`` and ``hybrid`` losses, the terms L_t of the bound differ by orders of magnitude
between timesteps, so a uniform draw gives a very noisy gradient. ``LossSecondMomentSampler``
keeps the last ``history`` losses of every timestep; until every t has that many it samples
uniformly, then with p_t proportional to sqrt(E[L_t^2]), mixed with ``uniform_prob`` of the uniform
distribution so that no p_t is 0. Each example's loss is weighted by 1 / (T p_t), which keeps the
objective an unbiased estimate of the uniform-t objective:

    E_{t ~ p}[L_t / (T p_t)] = sum_t p_t L_t / (T p_t) = (1/T) sum_t L_t = E_{t ~ U}[L_t].

That target, the uniform-t objective, is why ``train.timestep_sampler: loss_second_moment`` is
refused together with ``diffusion.timestep_distribution: edm_lognormal`` (``TrainConfig``), which
replaces the target with E_{t ~ p_EDM}[L_t]; without this sampler the step draws t from that p_EDM
directly (``DiffusionProcess.timestep_probabilities``) and weights nothing.

In data-parallel training every rank updates the sampler with the losses of *all* ranks (gathered
in rank order), so all ranks hold the same state and sample from the same distribution. Timesteps
are 0-based.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import numpy as np
import torch

from diffusion_core.validation import check_int_in_range, check_number_in

TimestepSamplerName = Literal["uniform", "loss_second_moment"]


class LossSecondMomentSampler:
    """Importance sampling of timesteps proportional to sqrt(E[L_t^2]) (Nichol & Dhariwal 2021,
    sec. 3.3, their ``LossSecondMomentResampler``).

    Args:
        num_timesteps: T (>= 2).
        history: losses kept per timestep (10 in the paper), >= 1.
        uniform_prob: weight of the uniform distribution in the mixture, in (0, 1].

    Raises:
        ValueError: on out-of-range arguments.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        check_int_in_range("num_timesteps", num_timesteps, 2)
        check_int_in_range("history", history, 1)
        check_number_in("uniform_prob", uniform_prob, 0.0, 1.0, low_open=True)
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = float(uniform_prob)
        self.losses = np.zeros((num_timesteps, history), dtype=np.float64)  # ring buffer per t
        self.counts = np.zeros(num_timesteps, dtype=np.int64)  # losses seen per t (capped at history)

    @property
    def warmed_up(self) -> bool:
        """Whether every timestep has ``history`` losses (before that, sampling is uniform)."""
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        """p_t, float64 ``[T]`` summing to 1."""
        if not self.warmed_up:
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        weights = np.sqrt(np.mean(self.losses**2, axis=1))
        weights = weights / weights.sum()
        return weights * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def weights(self, t: np.ndarray, probabilities: np.ndarray | None = None) -> np.ndarray:
        """1 / (T p_t) for 0-based timesteps ``t`` (int array ``[N]``), float64 ``[N]``."""
        p = self.probabilities() if probabilities is None else probabilities
        return 1.0 / (self.num_timesteps * p[np.asarray(t, dtype=np.int64)])

    def update(self, t: np.ndarray, losses: np.ndarray) -> None:
        """Record ``losses[i]`` (float, the unweighted per-example loss) for timestep ``t[i]``, in
        order; each timestep keeps its most recent ``history`` values.

        Raises:
            ValueError: if the shapes differ, a timestep is outside [0, T) or a loss is not finite.
        """
        t = np.asarray(t, dtype=np.int64).reshape(-1)
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if t.shape != losses.shape:
            raise ValueError(f"t has shape {t.shape} but losses has shape {losses.shape}; they must match")
        if t.size and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps - 1}] (0-based)")
        if not np.isfinite(losses).all():
            raise ValueError("losses must be finite (skipped steps are not recorded)")
        for step, loss in zip(t, losses):
            if self.counts[step] == self.history:
                self.losses[step, :-1] = self.losses[step, 1:]
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def digest(self) -> str:
        """sha256 of the loss history and counts: equal on every rank of a data-parallel run."""
        return hashlib.sha256(self.losses.tobytes() + self.counts.tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The state as tensors and numbers (loadable by ``torch.load(..., weights_only=True)``)."""
        return {"losses": torch.from_numpy(self.losses.copy()), "counts": torch.from_numpy(self.counts.copy()),
                "history": self.history, "uniform_prob": self.uniform_prob}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output.

        Raises:
            ValueError: if it was saved for another T or history length.
        """
        losses = np.asarray(state["losses"], dtype=np.float64)
        counts = np.asarray(state["counts"], dtype=np.int64)
        if losses.shape != self.losses.shape or counts.shape != self.counts.shape:
            raise ValueError(f"timestep sampler state of shape {losses.shape} does not fit T={self.num_timesteps}, "
                             f"history={self.history}")
        self.losses, self.counts = losses.copy(), counts.copy()


def build_timestep_sampler(name: TimestepSamplerName, num_timesteps: int) -> LossSecondMomentSampler | None:
    """The sampler of ``train.timestep_sampler``: ``None`` for "uniform" (timesteps drawn by
    ``example_timesteps_and_noise`` directly), else a ``LossSecondMomentSampler``."""
    return LossSecondMomentSampler(num_timesteps) if name == "loss_second_moment" else None
