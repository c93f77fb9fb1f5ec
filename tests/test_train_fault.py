"""Fault tolerance for real: SIGKILL a Ray Train worker process mid-run; training resumes from the
last checkpoint, reaches its step count, and MLflow keeps one continuous metric history. Then
re-submitting the same run name with more steps continues the same run and MLflow run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from _train_helpers import EXPERIMENT, read_worker_log, tiny_config
from mlflow import MlflowClient

from pipelines.mlflow_setup import resolve_tracking_uri
from pipelines.train import run

pytestmark = pytest.mark.slow
TOTAL, EVERY, KILL_AFTER, EXTENDED = 12, 4, 6, 14


class Killer(threading.Thread):
    """Waits until rank 1 has logged step ``KILL_AFTER`` (past the first checkpoint), then kills
    that worker's process with SIGKILL."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(daemon=True)
        self.log_dir = log_dir
        self.killed_pid: int | None = None
        self.killed_at_step: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            entries = read_worker_log(self.log_dir, 1)
            if entries and entries[-1]["step"] >= KILL_AFTER:
                self.killed_pid, self.killed_at_step = entries[-1]["pid"], entries[-1]["step"]
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.02)


def _history(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(resolve_tracking_uri()).get_metric_history(run_id, key))


def test_killed_worker_resumes_and_resubmission_extends(ray_local, fmnist_shards: Path, train_sandbox: Path) -> None:
    log_dir = train_sandbox / "fault-workers"
    config = tiny_config(
        fmnist_shards, train_sandbox / "runs", "fault",
        scaling__num_workers=2, scaling__max_failures=2, train__total_steps=TOTAL, train__checkpoint_every=EVERY,
        train__global_batch_size=32, train__worker_log_dir=str(log_dir), train__sample_every=0, train__bpd_every=0,
        train__final_bpd_images=0, tracking__registered_model_name=None,
    )
    killer = Killer(log_dir)
    killer.start()
    try:
        outcome = run(config)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed_pid is not None, "training ended before the worker could be killed"
    assert outcome["metrics"]["step"] == TOTAL and not outcome["resumed"]

    # the worker group was restarted (new processes) and resumed from a checkpoint, not step 0
    rank0 = read_worker_log(log_dir, 0)
    steps = [e["step"] for e in rank0]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from = steps[restart] - 1
    assert resumed_from % EVERY == 0 and EVERY <= resumed_from <= killer.killed_at_step
    assert steps[restart:] == list(range(resumed_from + 1, TOTAL + 1))
    assert rank0[restart]["pid"] != rank0[restart - 1]["pid"]
    assert killer.killed_pid not in {e["pid"] for e in read_worker_log(log_dir, 1)[-(TOTAL - resumed_from):]}

    # one MLflow run with every step exactly once
    run_id = outcome["mlflow_run_id"]
    client = MlflowClient(resolve_tracking_uri())
    experiment = client.get_experiment_by_name(EXPERIMENT)
    named = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'fault'")
    assert [r.info.run_id for r in named] == [run_id]
    for key in ("loss", "lr", "grad_norm", "loss_q0"):
        assert _history(run_id, key) == list(range(1, TOTAL + 1)), key

    # re-submitting the same run name resumes it (Ray Train restores the latest checkpoint)
    extended = run(config.replace({"train.total_steps": EXTENDED}))
    assert extended["resumed"] and extended["mlflow_run_id"] == run_id
    assert extended["metrics"]["step"] == EXTENDED
    new_steps = [e["step"] for e in read_worker_log(log_dir, 0)][-(EXTENDED - TOTAL):]
    assert new_steps == list(range(TOTAL + 1, EXTENDED + 1))
    assert _history(run_id, "loss") == list(range(1, EXTENDED + 1))
    tags = client.get_run(run_id).data.tags
    assert tags["ddpm.model_step"] == str(EXTENDED) and tags["ddpm.model_uri"] == f"runs:/{run_id}/model"
