"""The one timing loop of the benchmarks, in two forms with the same clock (``time.perf_counter``,
seconds) and the same ``sync`` hook (``torch.cuda.synchronize`` on a GPU, so that queued kernels are
inside the timed span; a no-op on CPU):

* ``time_calls``: call ``fn`` a number of untimed warm-up times (a compile happens there), then a
  number of timed times, one duration per timed call;
* ``ProgressTimer``: the ``progress(step, total)`` callback of a loop the benchmark does not own
  (``p_sample_loop``, ``calc_bpd_loop``...): one duration per step after the warm-up steps, and it
  stops the loop (``StopTiming``) once enough steps are timed, for extrapolating to all steps.

Standard library only."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class Timing:
    """Durations in seconds: ``seconds`` one per timed call or step; ``warmup_s`` of the untimed
    ones; ``first_s`` of the very first call (a compile's cost), ``None`` when nothing was untimed."""

    seconds: tuple[float, ...]
    warmup_s: float
    first_s: float | None

    @property
    def total(self) -> float:
        """Seconds of all timed calls together."""
        return sum(self.seconds)

    @property
    def mean(self) -> float:
        """Mean seconds per timed call."""
        return self.total / len(self.seconds)

    @property
    def median(self) -> float:
        """Median seconds per timed call (resists a shared machine's outliers)."""
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        """Fewest seconds of one timed call (the least disturbed)."""
        return min(self.seconds)


def time_calls(fn: Callable[[int], Any], calls: int, warmup: int = 0, sync: Callable[[], None] = _no_sync,
               sync_each: bool = True) -> Timing:
    """Call ``fn(i)`` ``warmup`` times untimed, then ``calls`` times timed (``i`` counts from 0 over
    all calls).

    Args:
        sync_each: ``sync()`` after every timed call (one duration each); ``False`` syncs only at the
            two ends of the timed span (no stall between calls) and reports ``calls`` equal
            durations, their mean.

    Raises:
        ValueError: if ``calls < 1`` or ``warmup < 0``.
    """
    if calls < 1 or warmup < 0:
        raise ValueError(f"calls={calls} must be >= 1 and warmup={warmup} >= 0")
    sync()
    start = time.perf_counter()
    first = None
    for i in range(warmup):
        fn(i)
        if i == 0:
            sync()
            first = time.perf_counter() - start
    sync()
    edges = [time.perf_counter()]
    for i in range(warmup, warmup + calls):
        fn(i)
        if sync_each:
            sync()
            edges.append(time.perf_counter())
    if not sync_each:
        sync()
        span = time.perf_counter() - edges[0]
        return Timing((span / calls,) * calls, edges[0] - start, first)
    return Timing(tuple(b - a for a, b in zip(edges, edges[1:])), edges[0] - start, first)


class StopTiming(Exception):
    """Raised by ``ProgressTimer`` to end the loop it times."""


class ProgressTimer:
    """``progress(step, total)`` callback: steps ``0..warmup-1`` untimed, then the durations of up to
    ``limit`` steps (``None``: every remaining step); raises ``StopTiming`` after the last one.

    Use ``run`` to time a loop: it catches ``StopTiming`` and returns the ``Timing``.
    """

    def __init__(self, sync: Callable[[], None] = _no_sync, warmup: int = 0, limit: int | None = None,
                 sync_each: bool = True):
        self.sync, self.warmup, self.limit, self.sync_each = sync, warmup, limit, sync_each
        self.start = 0.0
        self.marks: list[float] = []
        self.steps = 0

    def __call__(self, step: int, total: int) -> None:
        self.steps += 1
        if self.steps < self.warmup:
            return
        timed = self.steps - self.warmup  # 0 at the end of the warm-up: the timed span starts here
        last = self.limit is not None and timed >= self.limit
        if self.sync_each or timed == 0 or last:
            self.sync()
            self.marks.append(time.perf_counter())
        if last:
            raise StopTiming

    def run(self, loop: Callable[["ProgressTimer"], Any]) -> Timing:
        """``loop(self)`` (a sampling or bound loop taking ``progress=``), stopped after ``limit`` timed
        steps; its ``Timing`` (without ``sync_each``: ``n`` equal durations, their mean)."""
        self.sync()
        self.start = time.perf_counter()
        if self.warmup == 0:
            self.marks.append(self.start)
        try:
            loop(self)
        except StopTiming:
            pass
        else:  # the loop ended before ``limit``: its end closes the timed span
            self.sync()
            if not self.sync_each:
                self.marks.append(time.perf_counter())
        first_edge = self.marks[0]
        if self.sync_each:
            seconds = tuple(b - a for a, b in zip(self.marks, self.marks[1:]))
        else:
            n = self.steps - max(self.warmup, 0)
            seconds = ((self.marks[-1] - first_edge) / n,) * n
        return Timing(seconds, first_edge - self.start, None)
