"""Merge the network calls of several concurrent per-request loops into one forward pass.

``LockstepModel`` wraps a model ``model(x_t [N,C,H,W], t [N]) -> [N, C_out, H, W]``. Each
participant (one thread per request) runs an unchanged ``diffusion_core`` loop (e.g.
``calc_bpd_estimate`` with the request's own ``torch.Generator``) against the wrapper. A call
blocks until every participant that is still running has made its next call; then the inputs
are concatenated along N, the model runs once, and each caller gets back its own rows. A
participant that finishes (or fails) leaves, so the others never wait for it.

Results are those of running each request alone with its own generator (the random draws are
untouched); only the network's batch composition changes, which can move outputs by float32
rounding. No Ray, no global state.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_J = TypeVar("_J")
_R = TypeVar("_R")


@dataclass
class _Call:
    """One participant's pending call and, once ``done``, its output rows or its error."""

    x: torch.Tensor
    t: torch.Tensor
    output: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class LockstepModel:
    """A model wrapper that evaluates the concurrent calls of ``num_participants`` threads together.

    Args:
        model: the network (any callable ``(x [N,C,H,W] float32, t [N] int64) -> [N, C_out, H, W]``).
        num_participants: how many threads will call it; each must call ``leave()`` once when it
            is done (``run_lockstep`` does this).

    A merged forward that raises is retried call by call, so one participant's bad input fails
    only that participant (its call raises the error).
    """

    def __init__(self, model: Model, num_participants: int) -> None:
        if num_participants < 1:
            raise ValueError(f"num_participants={num_participants} must be >= 1")
        self._model = model
        self._live = num_participants
        self._pending: list[_Call] = []
        self._cond = threading.Condition()
        self.forward_batch_sizes: list[int] = []
        """Rows of every forward pass run so far (for tests and diagnostics)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Queue one call ``(x [n,C,H,W], t [n])`` and return the model's rows for it [n, C_out, H, W]."""
        call = _Call(x, t)
        with self._cond:
            self._pending.append(call)
            self._flush_if_ready()
            while not call.done:
                self._cond.wait()
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output

    def leave(self) -> None:
        """Mark one participant as finished; the remaining ones no longer wait for it."""
        with self._cond:
            self._live -= 1
            self._flush_if_ready()

    def _flush_if_ready(self) -> None:
        """Run the pending calls once every live participant has one queued (lock held)."""
        if not self._pending or len(self._pending) < self._live:
            return
        calls, self._pending = self._pending, []
        self._forward(calls)
        self._cond.notify_all()

    def _forward(self, calls: Sequence[_Call]) -> None:
        """Evaluate ``calls`` in one forward pass; if that raises, one pass per call (lock held)."""
        with torch.no_grad():
            if len(calls) > 1:
                try:
                    merged = self._model(torch.cat([c.x for c in calls]), torch.cat([c.t for c in calls]))
                except Exception:  # noqa: BLE001 - isolated below, call by call
                    merged = None
                if merged is not None:
                    self.forward_batch_sizes.append(int(merged.shape[0]))
                    for call, output in zip(calls, merged.split([c.x.shape[0] for c in calls])):
                        call.output, call.done = output, True
                    return
            for call in calls:
                try:
                    call.output = self._model(call.x, call.t)
                    self.forward_batch_sizes.append(int(call.x.shape[0]))
                except Exception as err:  # noqa: BLE001 - raised in the caller's thread
                    call.error = err
                call.done = True


def run_lockstep(
    model: Model, jobs: Sequence[_J], work: Callable[[Model, _J], _R]
) -> tuple[list[_R | Exception], LockstepModel]:
    """Run ``work(shared_model, job)`` for every job in its own thread, sharing network calls.

    Returns:
        (results, lockstep_model): per job, in order, its return value or the ``Exception`` it
        raised (one job's failure never affects another's result); the ``LockstepModel`` exposes
        ``forward_batch_sizes``.
    """
    shared = LockstepModel(model, len(jobs))

    def participant(job: _J) -> _R | Exception:
        try:
            return work(shared, job)
        except Exception as err:  # noqa: BLE001 - returned per job
            return err
        finally:
            shared.leave()

    if len(jobs) == 1:
        return [participant(jobs[0])], shared
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="lockstep") as pool:
        results = list(pool.map(participant, jobs))
    return results, shared
