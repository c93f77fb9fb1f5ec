"""Rank 0's progress lines (``pipelines.training.progress``): their format and the ETA arithmetic."""

from __future__ import annotations

import io

import pytest

from pipelines.training.progress import ProgressLog, format_duration


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.9, "0:00:59"), (61, "0:01:01"), (3 * 3600 + 62, "3:01:02"),
                                           (-5, "0:00:00")])
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


class FakeClock:
    """A monotonic clock that moves only when told to (seconds)."""

    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_step_line_extrapolates_the_eta_from_the_steps_since_the_start() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = ProgressLog(total_steps=1000, start_step=200, stream=stream, clock=clock)
    clock.now += 100.0  # 100 s since this start
    log.step(400, loss=0.04123, images_per_s=68.25)  # 200 steps in 100 s: 600 left take 300 s
    line = stream.getvalue().strip()
    assert line.startswith("step 400/1000  loss 0.0412  68.2 images/s  elapsed 0:01:40  eta 0:05:00")
    assert line.endswith("val_bpd -")
    log.val_bpd(400, 3.712, 0.25, 64, 8)
    log.step(500, loss=0.04, images_per_s=70.0)
    assert stream.getvalue().splitlines()[-1].endswith("val_bpd 3.712")
    assert "3.7120 +- 0.2500 bits/dim (64 validation images, K=8)" in stream.getvalue()


def test_event_lines_say_where_things_went() -> None:
    stream = io.StringIO()
    log = ProgressLog(total_steps=10, stream=stream)
    log.step(0, loss=1.0, images_per_s=1.0)  # no step done yet: no ETA
    log.checkpoint(5, "/runs/r/checkpoint_00000005")
    log.samples(5, "samples/step_00000005.png", "abc")
    log.model(10, "models:/ddpm/3")
    lines = stream.getvalue().splitlines()
    assert "eta -" in lines[0]
    assert lines[1:] == ["checkpoint at step 5 -> /runs/r/checkpoint_00000005",
                         "samples at step 5 -> MLflow run abc artifact samples/step_00000005.png",
                         "model at step 10 -> models:/ddpm/3"]


def test_eta_never_passes_the_end_of_the_time_budget() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = ProgressLog(total_steps=1_000_000, stream=stream, clock=clock)
    clock.now += 100.0  # 100 steps in 100 s: a million steps would take 11 days
    log.budget_ends_at = clock.now + 600.0  # but train.max_minutes ends the run in 10 minutes
    log.step(100, loss=0.1, images_per_s=64.0)
    assert "elapsed 0:01:40  eta 0:10:00  " in stream.getvalue()
    clock.now += 599.5
    log.step(101, loss=0.1, images_per_s=64.0)
    assert "eta 0:00:00" in stream.getvalue().splitlines()[-1]  # half a second left rounds down
