"""Loss statistics of the steps between two log points, summed over every worker."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Window:
    """Loss statistics over the steps since the last log point, reduced over all workers.

    Per-example losses are summed overall and by timestep quartile (q = floor(4 t / T), 0-based
    ``t``), so the logged ``loss`` is the mean over every image of every step of the window on
    every worker.
    """

    def __init__(self, num_timesteps: int, device: torch.device) -> None:
        self.num_timesteps = num_timesteps
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        # sums[5], counts[5], grad, steps, images, skipped steps
        self.stats = torch.zeros(14, dtype=torch.float64, device=self.device)
        self.started = time.perf_counter()

    def add(self, losses: torch.Tensor, t: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Add one step: per-example ``losses`` [N], timesteps ``t`` [N], the global grad norm. A
        skipped step (non-finite grad norm) counts its images and itself as skipped, no losses."""
        if not torch.isfinite(grad_norm):
            self.stats[12] += losses.numel()
            self.stats[13] += 1
            return
        losses = losses.detach().double()
        quartile = (t * 4) // self.num_timesteps
        self.stats[0] += losses.sum()
        self.stats[5] += losses.numel()
        self.stats[1:5].index_add_(0, quartile, losses)
        self.stats[6:10].index_add_(0, quartile, torch.ones_like(losses))
        self.stats[10] += grad_norm.detach().double()
        self.stats[11] += 1
        self.stats[12] += losses.numel()

    def reduce(self, world_size: int) -> dict[str, float]:
        """All-reduce (sum) over workers and return ``loss``, ``loss_q0..3``, ``grad_norm`` (over the
        steps not skipped), ``images_per_s`` (global images / wall seconds of the window) and
        ``skipped_steps`` (steps of the window skipped for a non-finite gradient); then reset. A
        collective when ``world_size`` > 1: every rank calls it at the same step."""
        stats = self.stats.clone()
        if world_size > 1:
            dist.all_reduce(stats)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        stats = stats.cpu().tolist()
        metrics = {"loss": stats[0] / max(stats[5], 1), "grad_norm": stats[10] / max(stats[11], 1),
                   "images_per_s": stats[12] / elapsed, "skipped_steps": stats[13] / max(world_size, 1)}
        for q in range(4):
            if stats[6 + q] > 0:
                metrics[f"loss_q{q}"] = stats[1 + q] / stats[6 + q]
        self.reset()
        return metrics
