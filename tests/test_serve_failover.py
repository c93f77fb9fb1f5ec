"""A model replica SIGKILLed under load: exactly the requests it held fail, each with 503 and
Retry-After; Serve replaces it, and requests sent after the kill succeed.

The model is served from a plain checkpoint folder (no registry), the other source `model_uri` takes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from _serve_helpers import save_tiny_checkpoint

from tooling.local_cluster import LocalRayCluster, derive_serve_config

pytestmark = pytest.mark.slow

# ~1 s of replica compute per round (4 requests batched: 20 network evaluations of 16 images), long
# against the milliseconds a request spends in the proxy and ingress on its way in and out
REQUEST = {"num_images": 4, "sampler": "ddim", "num_steps": 20, "seed": 3}
CLIENTS = 4
WARMUP_ROUNDS = 3
# CPU seconds the idle replica does not use in a round's first moments (its background threads take
# milliseconds a second) but its computing thread does within a tenth of the round
COMPUTING_CPU_S = 0.1


@dataclass(frozen=True)
class Outcome:
    round: int
    started: float
    finished: float
    status: int | None  # None: no HTTP response at all
    retry_after: str | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == 200


class Rounds:
    """The clients send their requests in rounds: all ``CLIENTS`` at once (a barrier), the next round
    when every one has its answer. The replica starts computing a round only once its batch has
    been formed from that round's requests (``batch_wait_timeout_s`` after the first arrives), so
    the main thread kills it when it sees the replica's CPU time rise after the round started."""

    def __init__(self) -> None:
        self.number = 0
        self.started = 0.0
        self.changed = threading.Condition()
        self.barrier = threading.Barrier(CLIENTS, action=self._next)

    def _next(self) -> None:  # run by one client when all have arrived, before any is released
        with self.changed:
            self.number += 1
            self.started = time.monotonic()
            self.changed.notify_all()

    def wait_for_round(self, number: int, timeout_s: float) -> float:
        """Block until round ``number`` has started; its start time."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.number >= number, timeout=timeout_s), (
                f"round {number} did not start in {timeout_s} s (at round {self.number})")
            assert self.number == number, f"missed the start of round {number} (already at {self.number})"
            return self.started


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


def _client(url: str, rounds: Rounds, stop: threading.Event, outcomes: list[Outcome], lock: threading.Lock) -> None:
    with requests.Session() as session:
        while True:
            try:
                rounds.barrier.wait(timeout=300)
            except threading.BrokenBarrierError:
                return
            if stop.is_set():
                return
            number, started = rounds.number, time.monotonic()
            try:
                response = session.post(f"{url}/sample", json=REQUEST, timeout=150)
                status, retry_after = response.status_code, response.headers.get("retry-after")
                detail = f"{response.status_code} {response.text[:200]}"
            except requests.RequestException as err:
                status, retry_after, detail = None, None, repr(err)[:120]
            with lock:
                outcomes.append(Outcome(number, started, time.monotonic(), status, retry_after, detail))


def _wait_until_computing(replica: psutil.Process, round_started: float, kill_round: int, outcomes: list[Outcome],
                          lock: threading.Lock) -> float:
    """Block until ``replica`` has used ``COMPUTING_CPU_S`` more CPU seconds than at the first poll
    (it computes the round's batch: the requests are on it); seconds from ``round_started``.

    Raises:
        AssertionError: if a request of ``kill_round`` is answered first, or nothing happens in 60 s.
    """
    times = replica.cpu_times()
    baseline = times.user + times.system
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        times = replica.cpu_times()
        if times.user + times.system - baseline >= COMPUTING_CPU_S:
            return time.monotonic() - round_started
        with lock:
            assert not [o for o in outcomes if o.round == kill_round], "answered before the replica was seen computing"
        time.sleep(0.005)
    raise AssertionError(f"the replica used under {COMPUTING_CPU_S} CPU s in the 60 s after round {kill_round} started")


def test_killed_replica_is_replaced_and_requests_after_recovery_succeed(served: LocalRayCluster) -> None:
    cluster = served
    (victim,) = cluster.model_replicas()
    outcomes: list[Outcome] = []
    lock, stop, rounds = threading.Lock(), threading.Event(), Rounds()
    clients = [threading.Thread(target=_client, args=(cluster.http, rounds, stop, outcomes, lock))
               for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        kill_round = WARMUP_ROUNDS + 1
        round_started = rounds.wait_for_round(kill_round, timeout_s=300)
        computing_after = _wait_until_computing(psutil.Process(victim["pid"]), round_started, kill_round,
                                                outcomes, lock)
        with lock:
            assert len(outcomes) == WARMUP_ROUNDS * CLIENTS and all(o.ok for o in outcomes), (
                [o.detail for o in outcomes if not o.ok][:3])
            fastest = min(o.finished - o.started for o in outcomes)
            assert not [o for o in outcomes if o.round == kill_round], "a request was answered before the kill"
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = killed_at + 240
        while time.monotonic() < deadline:  # rounds continue until two after the kill have succeeded
            with lock:
                if sum(o.ok and o.started > killed_at for o in outcomes) >= 2 * CLIENTS:
                    break
            time.sleep(0.5)
    finally:
        stop.set()
        rounds.barrier.abort()
        for client in clients:
            client.join(timeout=200)

    failed = [o for o in outcomes if not o.ok]
    during = [o for o in outcomes if o.started <= killed_at <= o.finished]
    after = [o for o in outcomes if o.started > killed_at]
    recovered_at = min((o.finished for o in after if o.ok), default=None)
    print(f"\nfailover: {len(failed)} of {len(outcomes)} requests failed ({CLIENTS} clients, in rounds; the fastest "
          f"warm-up request took {fastest:.2f} s; the replica was seen computing the kill round "
          f"{computing_after:.2f} s after it started; {len(during)} were in flight at the kill, {len(after)} started "
          f"after it); first success of a request started after the kill came "
          f"{None if recovered_at is None else round(recovered_at - killed_at, 2)} s after the kill; "
          f"failure kinds: {sorted({o.detail[:110] for o in failed})}")
    assert recovered_at is not None, "no request succeeded after the replica was killed"
    # every client had its request of the kill round on the replica when it died ...
    assert len(during) == CLIENTS and {o.round for o in during} == {kill_round}, during
    # ... exactly those requests failed: nothing before the kill, nothing sent after it ...
    assert set(failed) == set(during), (
        [(o.round, o.detail) for o in failed if o not in during], [(o.round, o.detail) for o in during if o.ok])
    # ... and each as a 503 asking to retry (Retry-After), never a 500, a dropped connection or a hang
    for o in failed:
        assert o.status == 503 and "retry" in o.detail, o.detail
        assert o.retry_after is not None and int(o.retry_after) > 0, (o.retry_after, o.detail)

    cluster.wait_healthy(timeout_s=120)
    (replacement,) = cluster.model_replicas()
    assert replacement["actor_id"] != victim["actor_id"] and replacement["pid"] != victim["pid"]
    for _ in range(8):
        response = requests.post(f"{cluster.http}/sample", json=REQUEST, timeout=60)
        assert response.status_code == 200, response.text
    info = requests.get(f"{cluster.http}/model", timeout=30).json()
    assert info["replica"]["pid"] == replacement["pid"] and info["uri"].endswith("checkpoint")
