"""``ray job submit`` of the training entry point to a real local ``ray start --head`` cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from _train_helpers import EXPERIMENT, REPO_ROOT, free_port
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


def _stop(process: subprocess.Popen) -> None:
    """Stop the ``ray start --block`` process we started and everything in its process group
    (GCS, raylet, dashboard, workers), SIGTERM first, then SIGKILL."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A head node of our own: own ports and temp dir, 4 logical CPUs, no token auth; its
    dashboard (the job API) on 127.0.0.1:<free port>. Yields the dashboard URL."""
    root = tmp_path_factory.mktemp("rayhead")
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    ports = {flag: free_port() for flag in ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--metrics-export-port",
                                            "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    command = [f"{VENV_BIN}/ray", "start", "--head", "--block", "--num-cpus", "4", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--node-ip-address", "127.0.0.1",
               "--temp-dir", temp_dir, "--disable-usage-stats",
               *[str(x) for flag, port in ports.items() for x in (flag, port)]]
    log = open(root / "ray-start.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{url}/api/version", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {(root / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, env
    finally:
        _stop(process)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_config(ray_head, fmnist_shards: Path, train_sandbox: Path) -> None:
    url, env = ray_head
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    runtime_env = {
        "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, "RAY_AUTH_MODE": "disabled",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
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
