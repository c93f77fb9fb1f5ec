"""``ray job submit`` of the training entry point to a real local ``ray start --head`` cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _train_helpers import EXPERIMENT, REPO_ROOT
from mlflow import MlflowClient

from tooling.local_cluster import LocalRayCluster

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A head node of our own (``tooling.local_cluster.LocalRayCluster``: free ports, own temp dir,
    4 logical CPUs, token auth). Yields its dashboard URL (the job API) and its environment."""
    cluster = LocalRayCluster(num_cpus=4)
    try:
        yield cluster.dashboard, cluster.env
    finally:
        cluster.stop()


def test_ray_job_submit_runs_the_tiny_config(ray_head, fmnist_shards: Path, train_sandbox: Path) -> None:
    url, env = ray_head
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
        "excludes": [".venv", ".git", "runs", "data", "mlartifacts", "*.db", "benchmarks/results"],
    }
    storage = train_sandbox / "job-runs"
    command = [
        f"{VENV_BIN}/ray", "job", "submit", "--address", url, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "pipelines/train.py", "--config", "configs/tiny_cpu.yaml",
        f"data.shards={fmnist_shards}", f"train.storage_path={storage}", "train.run_name=job",
        "train.total_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.sample_every=0",
        "train.bpd_every=0", "train.final_bpd_images=0", "scaling.torch_threads=1",
        f"tracking.experiment_name={EXPERIMENT}", "tracking.registered_model_name=ddpm-job",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert f"checkpoints: {storage / 'job'}" in output

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'job'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert run.data.tags["ddpm.model_uri"] == "models:/ddpm-job/1"
    assert (storage / "job" / "checkpoint_00000004" / "model.safetensors").is_file()

    # what the user reads in the job log: a progress line per logged step and one per checkpoint and
    # model, and none of the warnings this project's code used to cause
    for step in range(1, 5):
        assert output.count(f"step {step}/4  loss ") == 1, output[-4000:]  # once: not echoed by Train's print patch
    assert f"checkpoint at step 2 -> {storage / 'job' / 'checkpoint_00000002'}" in output
    assert "model at step 4 -> models:/ddpm-job/1" in output
    for ours in ("CloudPickle", "Add type hints to the `predict` method", "Grad strides do not match",
                 "Downloading artifacts:", "Uploading artifacts:",
                 "PYTHON worker processes have been started"):  # Ray Data's 32 footer-reader actors
        assert ours not in output, ours
