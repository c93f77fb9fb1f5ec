"""Training progress as plain lines on rank 0's stdout, which Ray forwards to the job log
(``ray job logs``): one line per ``train.log_every`` steps and one per checkpoint, sample grid and
evaluation saying where it went. No terminal control characters, so the lines read the same in a
log file as on a console.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` for a non-negative number of seconds (rounded down)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class ProgressLog:
    """Rank 0's progress printer for one (re)start of the worker group.

    Attributes:
        total_steps: ``train.total_steps``.
        start_step: the step this start resumed from (0 for a fresh run); the ETA extrapolates the
            steps per second since then.
        stream: where lines go (stdout by default; Ray captures it into the job log).
        clock: seconds of a monotonic clock (``time.monotonic``; tests pass their own).
        started: ``clock()`` at this start (default: when the log is made).
        budget_ends_at: ``clock()`` at which ``train.max_minutes`` runs out (``None``: no
            budget); the ETA is never later than that.
    """

    total_steps: int
    start_step: int = 0
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    clock: Callable[[], float] = time.monotonic
    started: float | None = None
    last_val_bpd: float | None = None
    budget_ends_at: float | None = None

    def __post_init__(self) -> None:
        """Start the ETA's clock now unless ``started`` was given."""
        if self.started is None:
            self.started = self.clock()

    def emit(self, line: str) -> None:
        """Write one line and flush it (a job log should show it at once). Written to the stream
        directly, not with ``print``: Ray Train V2 replaces ``print`` in its workers with one that
        sends the text to its logger and, when ``sys.stdout`` is not ``sys.__stdout__``, to the
        stream as well; in this project's training workers every printed line reached the job log
        twice."""
        self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, step: int, loss: float, images_per_s: float) -> None:
        """``step 120/3000  loss 0.0412  68.3 images/s  elapsed 0:05:12  eta 1:02:00  val_bpd 3.71``
        (``val_bpd``: the last held-out bits/dim estimate, ``-`` before the first)."""
        now = self.clock()
        elapsed = now - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        if self.budget_ends_at is not None:
            eta = min(eta, max(0.0, self.budget_ends_at - now)) if eta == eta else eta
        val = f"{self.last_val_bpd:.3f}" if self.last_val_bpd is not None else "-"
        eta_text = format_duration(eta) if eta == eta else "-"
        self.emit(f"step {step}/{self.total_steps}  loss {loss:.4f}  {images_per_s:.1f} images/s  "
                  f"elapsed {format_duration(elapsed)}  eta {eta_text}  val_bpd {val}")

    def val_bpd(self, step: int, bpd: float, stderr: float, num_images: int, num_samples: int) -> None:
        """The held-out estimate of ``step`` (bits/dim), remembered for the following step lines."""
        self.last_val_bpd = bpd
        self.emit(f"val_bpd at step {step}: {bpd:.4f} +- {stderr:.4f} bits/dim "
                  f"({num_images} validation images, K={num_samples}) -> MLflow metric val_bpd")

    def fd(self, step: int, fd: float, floor: float | None, num_images: int) -> None:
        """The Fréchet distance of ``step``'s EMA samples (and the floor, when measured then)."""
        floor_text = f", floor {floor:.3f} (real val images)" if floor is not None else ""
        self.emit(f"fd at step {step}: {fd:.3f} ({num_images} samples{floor_text}) -> MLflow metric fd")

    def exact_bpd(self, step: int, bpd: float, num_images: int) -> None:
        """The exact held-out bound at the end (bits/dim)."""
        self.emit(f"val_bpd_exact at step {step}: {bpd:.4f} bits/dim ({num_images} validation images) "
                  "-> MLflow metric val_bpd_exact")

    def samples(self, step: int, artifact: str, run_id: str) -> None:
        """A sample grid logged as an MLflow artifact."""
        self.emit(f"samples at step {step} -> MLflow run {run_id} artifact {artifact}")

    def checkpoint(self, step: int, path: str) -> None:
        """A checkpoint handed to Ray Train (``path``: where Ray Train persists it)."""
        self.emit(f"checkpoint at step {step} -> {path}")

    def model(self, step: int, model_uri: str) -> None:
        """The final EMA model logged (and registered when a name is configured)."""
        self.emit(f"model at step {step} -> {model_uri}")
