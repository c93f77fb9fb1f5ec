"""Ray token authentication of the clusters the project starts.

A head started like the demo's (``LocalRayCluster``: ``ray start --head --node-ip-address=127.0.0.1
--dashboard-host=127.0.0.1``, ``RAY_AUTH_MODE=token``) refuses a client without its token, on the
dashboard's job API and on the GCS, and accepts one with it; the entry points' in-process local
cluster (``pipelines.common.ray_auth.init_local_ray``) runs with token authentication and makes a private
token when there is none.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pipelines.common import ray_auth
from tooling.local_cluster import REPO, LocalRayCluster
from tooling.ray_auth import auth_headers

CONNECT = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("CONNECTED", ray.cluster_resources().get("CPU"))
"""


def _client_env(**auth: str) -> dict[str, str]:
    """This process's environment without any Ray token setting, plus ``auth``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    return {**env, **auth}


def _connect(address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CONNECT, address], env=env, capture_output=True, text=True,
                          timeout=180, cwd=REPO)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    head = LocalRayCluster(num_cpus=1)
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.slow
def test_the_job_api_needs_the_token(cluster: LocalRayCluster) -> None:
    jobs = f"{cluster.dashboard}/api/jobs/"
    assert requests.get(jobs, timeout=30).status_code == 401
    wrong = auth_headers("0" * 64)
    assert requests.get(jobs, headers=wrong, timeout=30).status_code == 403
    accepted = requests.get(jobs, headers=cluster.auth_headers, timeout=30)
    assert accepted.status_code == 200, accepted.text[:500]
    assert isinstance(accepted.json(), list)


@pytest.mark.slow
def test_a_ray_client_needs_the_token(cluster: LocalRayCluster, tmp_path: Path) -> None:
    address = f"127.0.0.1:{cluster.gcs_port}"
    refused = _connect(address, _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64))
    assert refused.returncode != 0 and "CONNECTED" not in refused.stdout, refused.stdout + refused.stderr[-3000:]
    assert "Authentication token is missing or incorrect" in refused.stderr, refused.stderr[-3000:]
    # A client that leaves authentication off sends no token at all: refused as well.
    no_token = _connect(address, _client_env(RAY_AUTH_MODE="disabled", HOME=str(tmp_path)))
    assert no_token.returncode != 0 and "CONNECTED" not in no_token.stdout, no_token.stderr[-3000:]

    token_file = tmp_path / "token"
    token_file.write_text(cluster.token)
    accepted = _connect(address, _client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)))
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "CONNECTED 1.0" in accepted.stdout


def test_ensure_local_token_writes_a_private_token_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    path = ray_auth.ensure_local_token()
    assert path == tmp_path / ".ray" / "auth_token"
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ray_auth.ensure_local_token() is None and path.read_text() == token  # kept, not replaced
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    path.unlink()
    assert ray_auth.ensure_local_token() is None and not path.exists()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "1" * 64)
    assert ray_auth.ensure_local_token() is None and not path.exists()


@pytest.mark.slow
def test_init_local_ray_runs_with_token_auth_and_makes_a_token(tmp_path: Path) -> None:
    script = (
        "import ray\n"
        "from ray._private.authentication.authentication_utils import is_token_auth_enabled\n"
        "from pipelines.common.ray_auth import init_local_ray\n"
        "init_local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "print('RESULT', ray.get(ray.remote(lambda: 41 + 1).remote()), is_token_auth_enabled())\n"
    )
    env = _client_env(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT 42 True" in done.stdout, done.stdout + done.stderr[-3000:]
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
