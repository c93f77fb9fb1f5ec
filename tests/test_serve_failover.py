"""A model replica SIGKILLed under load: Serve replaces it, and requests after recovery succeed.

The model is served from a plain checkpoint folder (no registry), the other source `model_uri` takes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from _serve_helpers import save_tiny_checkpoint

from tooling.local_cluster import LocalRayCluster, derive_serve_config

pytestmark = pytest.mark.slow

REQUEST = {"num_images": 1, "sampler": "ddim", "num_steps": 4, "seed": 3}
CLIENTS = 4


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    ok: bool
    detail: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path):
    root = tmp_path_factory.mktemp("serve-failover")
    checkpoint = save_tiny_checkpoint(root / "checkpoint", fashion_mnist_dir)
    cluster = LocalRayCluster(num_cpus=4)
    try:
        config = derive_serve_config(f"sqlite:///{root / 'unused.db'}", cluster, str(checkpoint), {})
        cluster.serve_deploy(config, root / "serve_config.yaml")
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()


def _client(url: str, stop: threading.Event, outcomes: list[Outcome], lock: threading.Lock) -> None:
    with requests.Session() as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(f"{url}/sample", json=REQUEST, timeout=60)
                ok, detail = response.status_code == 200, f"{response.status_code} {response.text[:200]}"
            except requests.RequestException as err:
                ok, detail = False, repr(err)[:80]
            with lock:
                outcomes.append(Outcome(started, time.monotonic(), ok, detail))


def test_killed_replica_is_replaced_and_requests_after_recovery_succeed(served: LocalRayCluster) -> None:
    cluster = served
    (victim,) = cluster.model_replicas()
    outcomes: list[Outcome] = []
    lock, stop = threading.Lock(), threading.Event()
    clients = [threading.Thread(target=_client, args=(cluster.http, stop, outcomes, lock)) for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(3.0)
        with lock:
            assert outcomes and all(o.ok for o in outcomes), [o.detail for o in outcomes if not o.ok][:3]
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = killed_at + 120
        while time.monotonic() < deadline:  # load continues until requests started after the kill succeed again
            with lock:
                if sum(o.ok and o.started > killed_at for o in outcomes) >= 2 * CLIENTS:
                    break
            time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=90)

    failed = [o for o in outcomes if not o.ok]
    during = [o for o in outcomes if o.started <= killed_at <= o.finished]
    after = [o for o in outcomes if o.started > killed_at]
    recovered_at = min((o.finished for o in after if o.ok), default=None)
    print(f"\nfailover: {len(failed)} of {len(outcomes)} requests failed ({CLIENTS} clients; "
          f"{len(during)} were in flight at the kill, {len(after)} started after it); first success of a request "
          f"started after the kill came {None if recovered_at is None else round(recovered_at - killed_at, 2)} s "
          f"after the kill; failure kinds: {sorted({o.detail[:110] for o in failed})}")
    assert recovered_at is not None, "no request succeeded after the replica was killed"
    # a request lost with the replica is a 503 asking to retry, never a 500 or a hang
    assert all(o.detail.startswith("503") and "retry" in o.detail for o in failed), [o.detail for o in failed][:3]

    cluster.wait_healthy(timeout_s=120)
    (replacement,) = cluster.model_replicas()
    assert replacement["actor_id"] != victim["actor_id"] and replacement["pid"] != victim["pid"]
    for _ in range(8):
        response = requests.post(f"{cluster.http}/sample", json=REQUEST, timeout=60)
        assert response.status_code == 200, response.text
    info = requests.get(f"{cluster.http}/model", timeout=30).json()
    assert info["replica"]["pid"] == replacement["pid"] and info["uri"].endswith("checkpoint")
