"""benchmarks/cpu_sampler.py: the per-process CPU accounting that bench_train.py reports."""

from __future__ import annotations

import os
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
    assert cores["busy"] + cores["other"] <= os.cpu_count() * 1.05  # no more than the machine has
    with pytest.raises(ValueError, match="fewer than two CPU snapshots"):
        sampler.cores_between(end + 10, end + 20)


def test_processes_are_labelled_by_ray_actor_daemon_or_executable() -> None:
    import bench_train
    import psutil

    actor = subprocess.Popen(["bash", "-c", "exec -a 'ray::SplitCoordinator.start' sleep 30"])
    daemon = subprocess.Popen(["bash", "-c", "exec -a /venv/ray/core/src/ray/raylet/raylet sleep 30"])
    try:
        deadline = time.monotonic() + 30

        def exec_done(proc: subprocess.Popen) -> bool:  # the command line reads empty while exec runs
            cmdline = psutil.Process(proc.pid).cmdline()
            return bool(cmdline) and cmdline[0] != "bash"

        while not all(exec_done(p) for p in (actor, daemon)):
            assert time.monotonic() < deadline, "exec never replaced bash"
            time.sleep(0.05)
        assert bench_train.process_label(psutil.Process(actor.pid)) == "ray::SplitCoordinator.start"
        assert bench_train.process_label(psutil.Process(daemon.pid)) == "raylet"
        group = bench_train.classify(ray_training=False)
        assert group(psutil.Process()) == "training"
        assert group(psutil.Process(actor.pid)) == "ray::SplitCoordinator.start"
    finally:
        for proc in (actor, daemon):
            proc.kill()
            proc.wait()
