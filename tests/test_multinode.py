"""Two Ray nodes on one machine, no shared disk between the pipeline's steps: preprocessing and 2-worker
DDP training submitted as Ray jobs, with shards and checkpoints on an S3-compatible server over HTTP
(moto on 127.0.0.1), as they would run across a real cluster.

Node layout (logical CPUs, on a 2-core machine): the head has 3 CPUs and the custom resource
``head_node``, the second node 2 CPUs and ``second_node``. Training asks for 2 workers x 2 CPUs, so
each node can host only one of them (and the head keeps 1 CPU for Ray Data's ingest); the
preprocessing job's driver is pinned to the second node with ``--entrypoint-resources``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from ray.experimental import internal_kv
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from pipelines.data.shards.reader import load_manifest, read_split_numpy
from tooling.local_cluster import free_port, free_ports
from tooling.ray_auth import auth_headers, use_token_auth
from tooling.s3_server import S3Server, running_s3_server

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
BUCKET = "ray-ddpm-multinode"
NUM_IMAGES = 1200
TOTAL_STEPS = 12
RUN_NAME = "multinode"


@pytest.fixture
def s3() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request at INFO
    with running_s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


@dataclass(frozen=True)
class TwoNodes:
    """The running cluster: its GCS address, dashboard URL and the node id of each node."""

    address: str
    dashboard: str
    head_id: str
    second_id: str


def _ray_start(args: list[str], temp_dir: str, groups: list[int]) -> None:
    """Run `ray start ...` (returns once the node is up) in a new process group, appended to ``groups``
    first thing. The node's processes stay in that group, so they can be stopped together without
    `ray stop` (which would stop every Ray cluster on the machine)."""
    command = [RAY_CLI, "start", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
               "--object-store-memory=200000000", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", *args]  # the default 52365 fits one node per machine
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=REPO)
    groups.append(process.pid)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output


def _stop_group(pgid: int) -> None:
    """SIGTERM to every process of the group, SIGKILL to those still alive after 8 s."""
    members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=8)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoNodes]:
    """A head (3 CPUs, `head_node`, dashboard + job API) and a second node (2 CPUs, `second_node`),
    both `ray start` on one short temp dir, with token authentication (the session's token, see
    tests/conftest.py). The nodes carry no S3 settings: jobs bring them."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    temp_dir = tempfile.mkdtemp(prefix="rmn-")  # short: Ray's socket paths must fit in 107 bytes
    gcs_port, dashboard_port, client_port = free_ports(3)
    address, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    groups: list[int] = []
    kv_client = internal_kv.internal_kv_get_gcs_client()  # this process's own Ray, if any
    try:
        _ray_start(
            ["--head", f"--port={gcs_port}", "--num-cpus=3", '--resources={"head_node": 1}',
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={client_port}"],
            temp_dir, groups,
        )
        _ray_start([f"--address={address}", "--num-cpus=2", '--resources={"second_node": 1}'], temp_dir, groups)
        _wait_for_job_api(dashboard)
        # The state API is asked through the dashboard's HTTP URL, never the GCS address: given a GCS
        # address, Ray points this process's global internal-KV client at that GCS, and once this
        # cluster is stopped the process's next Ray call waits 60 s for it and then exits.
        nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True)
        by_resource = {name: n.node_id for n in nodes for name in ("head_node", "second_node") if name in n.resources_total}
        assert len(nodes) == 2 and len(by_resource) == 2, nodes
        yield TwoNodes(address, dashboard, by_resource["head_node"], by_resource["second_node"])
    finally:
        for pgid in reversed(groups):
            _stop_group(pgid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    # Nothing here may have re-pointed this process's Ray at the stopped cluster (see above).
    assert internal_kv.internal_kv_get_gcs_client() is kv_client


def _wait_for_job_api(dashboard: str) -> None:
    """Return once the job API accepts jobs. The dashboard refuses connections until it is up, and
    the head's job agent registers some seconds later (longer on a busy machine); until then a
    submission fails with HTTP 500 "No available agent". A no-op job is submitted with urllib3's
    retry policy for both."""
    retry = Retry(total=20, connect=20, backoff_factor=0.5, backoff_max=4, status_forcelist=[500], allowed_methods=None)
    with requests.Session() as session:
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.headers.update(auth_headers(use_token_auth()))
        session.post(f"{dashboard}/api/jobs/", json={"entrypoint": "true"}, timeout=30).raise_for_status()


def _submit(dashboard: str, submission_id: str, env: dict[str, str], entrypoint: list[str],
            entrypoint_resources: dict[str, float]) -> str:
    """`ray job submit` (waits for the job; exit code 1 when it fails); returns its output."""
    command = [
        RAY_CLI, "job", "submit", "--address", dashboard, "--submission-id", submission_id,
        "--entrypoint-resources", json.dumps(entrypoint_resources),
        "--runtime-env-json", json.dumps({"env_vars": env}),
        "--", *entrypoint,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"job {submission_id} failed:\n{output[-6000:]}"
    return output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preprocess_and_ddp_training_across_two_nodes_with_s3_storage(
    two_nodes, s3: S3Server, fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cluster = two_nodes
    shards_uri, storage_uri = f"s3://{BUCKET}/shards/fashion-mnist", f"s3://{BUCKET}/ray-results"
    job_env = {**s3.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
               "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}

    # 1. Preprocessing, driven from the second node, writes shards + manifest to S3.
    _submit(
        cluster.dashboard, "multinode-preprocess", job_env,
        [sys.executable, str(REPO / "pipelines" / "preprocess.py"), "--input", str(fashion_mnist_dir),
         "--output", shards_uri, "--limit", str(NUM_IMAGES)],
        {"second_node": 1},
    )
    client = JobSubmissionClient(cluster.dashboard)
    assert client.get_job_info("multinode-preprocess").driver_node_id == cluster.second_id
    keys = s3.list_keys(BUCKET, "shards/fashion-mnist/")
    assert "shards/fashion-mnist/manifest.json" in keys
    assert any(k.startswith("shards/fashion-mnist/train/") and k.endswith(".parquet") for k in keys), keys
    assert any(k.startswith("shards/fashion-mnist/val/") and k.endswith(".parquet") for k in keys), keys
    for name, value in s3.env().items():  # read the bucket back from this process too
        monkeypatch.setenv(name, value)
    manifest = load_manifest(shards_uri)
    assert manifest.counts["train"] + manifest.counts["val"] + len(manifest.rejected) == NUM_IMAGES
    assert tuple(manifest.image_shape) == (1, 28, 28)
    images, _ = read_split_numpy(shards_uri, "val", limit=8)
    assert images.shape == (8, 1, 28, 28) and images.min() >= -1.0 and images.max() <= 1.0

    # 2. Two DDP workers (one per node) read the shards from S3 and checkpoint to S3.
    overrides = [
        f"data.shards={shards_uri}", f"train.storage_path={storage_uri}", f"train.run_name={RUN_NAME}",
        f"train.total_steps={TOTAL_STEPS}", "train.global_batch_size=16", "train.log_every=3",
        "train.checkpoint_every=6", "train.keep_checkpoints=2", "train.sample_every=0", "train.bpd_every=0",
        "train.final_bpd_images=0", "scaling.num_workers=2", "scaling.cpus_per_worker=2",
        "scaling.torch_threads=1", "scaling.max_failures=0", "tracking.experiment_name=multinode",
        "tracking.registered_model_name=null", "tracking.log_system_metrics=false",
    ]
    output = _submit(
        cluster.dashboard, "multinode-train", job_env,
        [sys.executable, str(REPO / "pipelines" / "train.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
         *overrides],
        {"head_node": 1},
    )
    assert f"finished at step {TOTAL_STEPS}" in output, output[-3000:]

    run_keys = s3.list_keys(BUCKET, f"ray-results/{RUN_NAME}/")
    checkpoints = sorted({k.split("/")[2] for k in run_keys if re.fullmatch(r"checkpoint_\d+", k.split("/")[2])})
    assert checkpoints, run_keys
    last = f"ray-results/{RUN_NAME}/{checkpoints[-1]}"
    for name in ("model.safetensors", "config.json", "train_state.json"):
        assert f"{last}/{name}" in run_keys, (name, run_keys)
    state = json.loads(s3.client().get_object(Bucket=BUCKET, Key=f"{last}/train_state.json")["Body"].read())
    assert state["step"] == TOTAL_STEPS
    assert state["world_size"] == 2

    workers = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == {cluster.head_id, cluster.second_id}
