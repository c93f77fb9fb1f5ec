"""A gate between a preprocessing job's shard writers and its clean-up, so a failed job leaves nothing.

When a Ray Data job fails, Ray Data cancels the job's other tasks (``ray.cancel``, which raises
``KeyboardInterrupt`` in each task) and returns without waiting for them. A task interrupted in the
middle of writing a shard to S3 can leave the upload to finish in the background, and a task still
running can write after the driver removed the staging folder: either way a shard is left behind.

The gate closes both holes:

* every task writes its shards inside :func:`admitted`: it enters the :class:`StagingGate` actor
  (refused once the gate is closed), writes, and leaves, with ``KeyboardInterrupt`` deferred to the
  end of that section (:func:`deferred_interrupts`), so an admitted write always completes;
* on failure the driver calls :func:`close_and_drain` (no more admissions; wait until every admitted
  writer has left) and only then removes the staging folder.

The actor serializes ``enter`` and ``close``, so no writer can slip in after the driver's check.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import uuid
from typing import Any, Iterator

import ray


class StagingGate:
    """Admits shard writers while open; after ``close_and_drain`` admits none (a Ray async actor).

    Methods run on the actor's event loop, one at a time between awaits, so an ``enter`` either
    happens before ``close_and_drain`` (and is waited for) or after it (and is refused). Writers
    are named by a token, so ``leave`` can be sent whether or not the ``enter`` got through.
    """

    def __init__(self) -> None:
        self._open = True
        self._inside: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def enter(self, token: str) -> bool:
        """Admit writer ``token``; False once the gate is closed (the caller must then write nothing)."""
        if not self._open:
            return False
        self._inside.add(token)
        self._idle.clear()
        return True

    async def leave(self, token: str) -> None:
        """Writer ``token`` is done; a no-op for a token that was never admitted."""
        self._inside.discard(token)
        if not self._inside:
            self._idle.set()

    async def close_and_drain(self, timeout_s: float) -> int:
        """Refuse new writers, then wait until the admitted ones have left or ``timeout_s`` passed.

        Returns:
            the number of writers still inside (0 unless the timeout expired, e.g. a writer's
            worker process died without leaving).
        """
        self._open = False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return len(self._inside)


def start_gate() -> Any:
    """A new ``StagingGate`` actor (0 CPUs) on the current Ray cluster; its handle."""
    return ray.remote(num_cpus=0)(StagingGate).remote()


def close_and_drain(gate: Any, timeout_s: float = 120.0) -> int:
    """Driver side: close ``gate`` and wait for its admitted writers (see ``StagingGate.close_and_drain``)."""
    return ray.get(gate.close_and_drain.remote(timeout_s))


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back ``KeyboardInterrupt`` (SIGINT, which ``ray.cancel`` sends to a task) until the
    block has finished, then raise it. Outside the main thread (where Python cannot install a
    signal handler) the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def admitted(gate: Any | None) -> Iterator[bool]:
    """Task side: the section in which a task writes its shards. Yields whether it may write
    (always True without a gate); the gate is left even when entering or writing fails, and an
    interrupt that arrives meanwhile is raised after the section (:func:`deferred_interrupts`)."""
    if gate is None:
        yield True
        return
    token = uuid.uuid4().hex
    with deferred_interrupts():
        try:
            # Waited for as a future, not with ray.get: a task blocked in ray.get lends its CPU back
            # to the raylet, which then starts extra worker processes for queued tasks
            # (benchmarks/RESULTS.md, "Preprocessing", has the measurement).
            yield gate.enter.remote(token).future().result()
        finally:
            # Sent even if the enter raised (e.g. an interrupted wait after the actor admitted us),
            # and not waited for: calls from one caller reach the actor in order.
            gate.leave.remote(token)
