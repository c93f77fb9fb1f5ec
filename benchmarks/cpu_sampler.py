"""CPU time of every process on the machine, sampled in the background, for benchmarks that need to
say where the cores went during a measured period (e.g. the training loop vs Ray's own processes)."""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

Classifier = Callable[[psutil.Process], str]


@dataclass
class CpuSampler:
    """Snapshots of each process's cumulative CPU seconds (user + system, all threads) every
    ``interval`` seconds while running; ``cores_between`` turns two snapshots into cores per group.

    Use as a context manager. ``classify`` maps a process to a group name (e.g. "training",
    "other"); it is called at every snapshot, since a process may rename itself (a Ray worker
    becomes ``ray::<Actor>`` once it hosts an actor), and the group at the end of a period counts.
    """

    classify: Classifier
    interval: float = 1.0
    _times: list[float] = field(default_factory=list)
    _snapshots: list[dict[int, tuple[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "CpuSampler":
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._snapshot()
            self._stop.wait(self.interval)
        self._snapshot()

    def _snapshot(self) -> None:
        now, cpu = time.time(), {}
        for proc in psutil.process_iter():
            try:
                times, group = proc.cpu_times(), self.classify(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            cpu[proc.pid] = (group, times.user + times.system)
        self._times.append(now)
        self._snapshots.append(cpu)

    def cores_between(self, start: float, end: float) -> dict[str, float]:
        """Average cores used by each group between the first snapshot at or after ``start`` and the
        last at or before ``end`` (Unix seconds). A process that started in between counts from 0;
        one that exited before the last snapshot is left out.

        Raises:
            ValueError: fewer than two snapshots lie in ``[start, end]``.
        """
        first = bisect.bisect_left(self._times, start)
        last = bisect.bisect_right(self._times, end) - 1
        if last <= first:
            raise ValueError(f"fewer than two CPU snapshots between {start:.3f} and {end:.3f}")
        before, after = self._snapshots[first], self._snapshots[last]
        wall = self._times[last] - self._times[first]
        cores: dict[str, float] = {}
        for pid, (group, seconds) in after.items():
            cores[group] = cores.get(group, 0.0) + (seconds - before.get(pid, ("", 0.0))[1]) / wall
        return cores
