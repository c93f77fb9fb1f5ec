"""The training wall-time budget (``train.max_minutes``): all ranks stop at the same step once the
run's training time, summed over every resume, reaches it.

Each rank counts the seconds since its loop started plus the seconds restored from the checkpoint
(``TrainState.train_seconds``, rank 0's count when it was written). Rank 0's verdict is broadcast at
every log step, so the ranks of a DDP group never disagree about the last step (a rank that stopped
alone would leave the others waiting in an all-reduce).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist


class TimeBudget:
    """Wall-clock seconds of training, with the budget of ``max_minutes`` (0: none).

    Args:
        max_minutes: the budget in minutes (>= 0; 0 disables it).
        seconds_before: training seconds of earlier attempts of this run (from its checkpoint).
        clock: seconds of a monotonic clock (``time.monotonic``; tests pass their own).
    """

    def __init__(self, max_minutes: float, seconds_before: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_seconds = 60.0 * float(max_minutes)
        self.seconds_before = float(seconds_before)
        self.clock = clock
        self._start = clock()

    def start(self) -> None:
        """Start this attempt's clock now (the training loop's first line): set-up time before
        the loop (building the model, opening the MLflow run) is not training time."""
        self._start = self.clock()

    def seconds(self) -> float:
        """Training seconds so far: the earlier attempts' plus this one's."""
        return self.seconds_before + self.clock() - self._start

    def ends_at(self) -> float | None:
        """The ``clock()`` value at which the budget runs out (``None``: no budget)."""
        return self._start + self.max_seconds - self.seconds_before if self.max_seconds else None

    def spent(self, world_size: int) -> bool:
        """Whether the budget is used up, by rank 0's clock on every rank (a collective when
        ``world_size`` > 1, the budget is on and ``torch.distributed`` is initialized: every rank
        must call it at the same step)."""
        if not self.max_seconds:
            return False
        flag = torch.tensor([1 if self.seconds() >= self.max_seconds else 0], dtype=torch.int64)
        if world_size > 1 and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.broadcast(flag, src=0)
        return bool(flag.item())
