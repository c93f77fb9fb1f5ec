"""benchmarks/cpu_sampler.py: the per-process CPU accounting that bench_train.py reports."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cpu_sampler import CpuSampler  # noqa: E402


def test_a_busy_process_counts_as_about_one_core() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with CpuSampler(lambda proc: "busy" if proc.pid == busy.pid else "other", interval=0.2) as sampler:
            start = time.time()
            time.sleep(3.0)
            end = time.time()
    finally:
        busy.kill()
        busy.wait()
    cores = sampler.cores_between(start, end)
    assert 0.6 < cores["busy"] <= 1.05  # a spinning process: one core, less what the machine's load takes
    assert cores["other"] < 1.0
    with pytest.raises(ValueError, match="fewer than two CPU snapshots"):
        sampler.cores_between(end + 10, end + 20)
