"""Fault tolerance for real: SIGKILL a Ray Train worker process mid-run; training resumes from the
last checkpoint, reaches its step count, and MLflow keeps one continuous metric history. Then
re-submitting the same run name with more steps continues the same run and MLflow run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import EXPERIMENT, checkpoint_states, tiny_config
from mlflow import MlflowClient

from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.launcher import run
from pipelines.training.tags import RESUMED_FROM_TAG

pytestmark = pytest.mark.slow
TOTAL, EVERY, EXTENDED = 12, 4, 14


class Killer(threading.Thread):
    """Waits until Ray Train has registered the run's first checkpoint (its checkpoint-manager
    snapshot in the run folder names it) and SIGKILLs the process of rank 1, whose pid that
    checkpoint records among its replicas."""

    def __init__(self, run_folder: Path) -> None:
        super().__init__(daemon=True)
        self.run_folder = run_folder
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def registered_checkpoint(self) -> Path | None:
        try:
            snapshot = json.loads((self.run_folder / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):  # not written yet, or being written
            return None
        latest = snapshot.get("latest_checkpoint_result")
        return self.run_folder / latest["checkpoint_dir_name"] if latest else None

    def run(self) -> None:
        while not self.stop.is_set():
            checkpoint = self.registered_checkpoint()
            if checkpoint is not None:
                state = json.loads((checkpoint / "train_state.json").read_text())
                self.killed_pid = state["replicas"][1]["pid"]
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.02)


def _history(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(resolve_tracking_uri()).get_metric_history(run_id, key))


def test_killed_worker_resumes_and_resubmission_extends(ray_local, fmnist_shards: Path, train_sandbox: Path) -> None:
    config = tiny_config(
        fmnist_shards, train_sandbox / "runs", "fault",
        scaling__num_workers=2, scaling__max_failures=2, train__total_steps=TOTAL, train__checkpoint_every=EVERY,
        train__keep_checkpoints=TOTAL // EVERY + 1, train__global_batch_size=32, train__sample_every=0,
        train__bpd_every=0, train__final_bpd_images=0, tracking__registered_model_name=None,
        diffusion__loss="hybrid", train__timestep_sampler="loss_second_moment",
    )
    killer = Killer(train_sandbox / "runs" / "fault")
    killer.start()
    try:
        outcome = run(config)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed_pid is not None, "training ended before the worker could be killed"
    assert outcome["metrics"]["step"] == TOTAL and not outcome["resumed"]

    # the worker group was restarted (new processes) and resumed from a checkpoint, not step 0
    run_id = outcome["mlflow_run_id"]
    client = MlflowClient(resolve_tracking_uri())
    resumed_from = int(client.get_run(run_id).data.tags[RESUMED_FROM_TAG])
    assert resumed_from % EVERY == 0 and EVERY <= resumed_from < TOTAL
    states = checkpoint_states(outcome["run_folder"])
    assert list(states) == list(range(EVERY, TOTAL + 1, EVERY))
    before = {r["pid"] for r in states[resumed_from]["replicas"]}
    assert killer.killed_pid in before
    for step in range(resumed_from + EVERY, TOTAL + 1, EVERY):
        after = {r["pid"] for r in states[step]["replicas"]}
        assert after.isdisjoint(before), f"checkpoint {step} was written by the processes from before the kill"

    # the importance sampler's loss history: the same on both ranks at every checkpoint, and restored
    # at the resume (the state after it extends the resumed one for every timestep)
    for step, state in states.items():
        digests = {r["timestep_sampler_sha256"] for r in state["replicas"]}
        assert len(digests) == 1, f"the ranks' timestep samplers differ at step {step}"
    counts = {step: torch.load(Path(outcome["run_folder"]) / f"checkpoint_{step:08d}" / "optimizer.pt",
                               weights_only=True)["timestep_sampler"]["counts"] for step in states}
    assert int(counts[resumed_from].sum()) == 32 * resumed_from  # 32 images a step, no timestep at 10 yet
    after = counts[TOTAL]
    assert bool((after >= counts[resumed_from]).all()) and int(after.sum()) > int(counts[resumed_from].sum())

    # one MLflow run with every step exactly once
    experiment = client.get_experiment_by_name(EXPERIMENT)
    named = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'fault'")
    assert [r.info.run_id for r in named] == [run_id]
    for key in ("loss", "lr", "grad_norm", "loss_q0"):
        assert _history(run_id, key) == list(range(1, TOTAL + 1)), key

    # re-submitting the same run name resumes it (Ray Train restores the latest checkpoint)
    extended = run(config.replace({"train.total_steps": EXTENDED}))
    assert extended["resumed"] and extended["mlflow_run_id"] == run_id
    assert extended["metrics"]["step"] == EXTENDED
    assert client.get_run(run_id).data.tags[RESUMED_FROM_TAG] == str(TOTAL)
    assert max(checkpoint_states(outcome["run_folder"])) == EXTENDED
    assert _history(run_id, "loss") == list(range(1, EXTENDED + 1))
    tags = client.get_run(run_id).data.tags
    assert tags["ddpm.model_step"] == str(EXTENDED) and tags["ddpm.model_uri"] == f"runs:/{run_id}/model"
