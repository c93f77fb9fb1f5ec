"""A private local Ray cluster with Ray Serve, for tests, benchmarks and trying the app on one machine.

``LocalRayCluster`` runs ``ray start --head --block`` on free ports with its own temp dir (so it
never meets another cluster on the machine), deploys Serve configs with the ``serve deploy`` CLI
(the production path), and stops by pid: SIGTERM to the ``ray start`` process and its
descendants, SIGKILL to what is left. ``ray stop``, which stops every cluster of the user, is
never used. ``derive_serve_config`` adapts ``deploy/serve_config.yaml`` to such a cluster.

Development tooling: it needs ``requests`` and ``psutil`` (the ``dev`` extra).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from tooling.ray_auth import auth_headers, use_token_auth

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port that was free a moment ago, below the ephemeral range (see ``free_ports``)."""
    return free_ports(1)[0]


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``), 32768 if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports, free a moment ago, for servers that a child process binds later.

    They are drawn at random from [20000, start of the ephemeral range) minus this process's
    ``worker_port_range()``. Below the ephemeral range, no outgoing connection of any process can
    take one of them between this check and the server's bind (a port drawn with ``bind(0)`` can,
    and ``ray start`` then fails to start its gRPC server on it). Each
    candidate is bound on all interfaces, and all sockets stay bound until every port is drawn, so
    the ports are distinct (``ray start`` exits 1 when two of its components share a port).

    Raises:
        RuntimeError: if fewer than ``count`` free ports are found in the range.
    """
    low_worker, high_worker = worker_port_range()
    candidates = [p for p in range(20000, _ephemeral_low()) if not low_worker <= p <= high_worker]
    random.SystemRandom().shuffle(candidates)
    ports: list[int] = []
    with ExitStack() as stack:
        for port in candidates:
            if len(ports) == count:
                break
            sock = stack.enter_context(closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            try:
                sock.bind(("", port))
            except OSError:
                continue
            ports.append(port)
    if len(ports) < count:
        raise RuntimeError(f"only {len(ports)} of {count} free TCP ports in 20000-{_ephemeral_low() - 1}")
    return ports


def worker_port_range(width: int = 100) -> tuple[int, int]:
    """A ``width``-port range for a node's workers, below the kernel's ephemeral range.

    ``free_ports`` never draws from it; ``ray start`` exits 1 if a component port falls inside the
    worker range. The range depends on the process id, so two test processes rarely share it;
    Ray's own default (10002-19999, used by ``ray.init()`` clusters) is avoided too.
    """
    slots = max(1, (_ephemeral_low() - 20000) // width)
    start = 20000 + (os.getpid() % slots) * width
    return start, start + width - 1


class LocalRayCluster:
    """``ray start --head --block`` on free ports with its own temp dir; ``stop()`` ends it by pid.

    Token authentication is on (``tooling.ray_auth.use_token_auth``: ``RAY_AUTH_MODE=token`` and a
    token in this process's environment, which ``env`` passes on to the CLIs); ``auth_headers``
    authenticate HTTP requests to its dashboard.

    Args:
        num_cpus: logical CPUs of the node (may exceed the machine's cores).

    Raises:
        RuntimeError / TimeoutError: if ``ray start`` exits or its dashboard's Serve API does not answer in 180 s.
    """

    def __init__(self, num_cpus: int = 4) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rs_", dir="/tmp")  # short: Ray's socket paths are length-limited
        drawn = free_ports(10)
        self.gcs_port, self.dashboard_port, self.http_port = drawn[:3]
        min_worker, max_worker = worker_port_range()
        ports = {
            "--port": self.gcs_port, "--dashboard-port": self.dashboard_port,
            "--node-manager-port": drawn[3], "--object-manager-port": drawn[4],
            "--ray-client-server-port": drawn[5], "--dashboard-agent-listen-port": drawn[6],
            "--dashboard-agent-grpc-port": drawn[7], "--metrics-export-port": drawn[8],
            "--runtime-env-agent-port": drawn[9], "--min-worker-port": min_worker,
            "--max-worker-port": max_worker,
        }
        command = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
                   f"--temp-dir={self.temp_dir}", "--object-store-memory=150000000", "--disable-usage-stats"]
        command += [f"{flag}={value}" for flag, value in ports.items()]
        self.token = use_token_auth()  # this process's Ray clients (state API) need it too
        self.auth_headers = auth_headers(self.token)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)  # the CLIs talk to this cluster, whatever the caller's default
        self.log = open(Path(self.temp_dir) / "ray_start.log", "wb")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=str(REPO))
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        self._wait_for_dashboard(timeout_s=180)

    def _wait_for_dashboard(self, timeout_s: float) -> None:
        """Wait until the dashboard's Serve REST API (what ``serve deploy`` talks to) answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}; the end of its log "
                                   f"({self.log.name}):\n{self._log_tail()}")
            try:
                if requests.get(f"{self.dashboard}/api/serve/applications/", headers=self.auth_headers,
                                timeout=10).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard at {self.dashboard} did not come up in {timeout_s} s; the end of "
                           f"the ray start log ({self.log.name}):\n{self._log_tail()}")

    def _log_tail(self, chars: int = 4000) -> str:
        """The last ``chars`` characters of the ``ray start`` log (for error messages)."""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def serve_deploy(self, config: dict[str, Any], path: Path) -> None:
        """Write ``config`` to ``path`` and ``serve deploy`` it to this cluster (CLI).

        Raises:
            RuntimeError: if ``serve deploy`` fails (the message holds the end of its stderr).
        """
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        done = subprocess.run([str(VENV_BIN / "serve"), "deploy", str(path), "--address", self.dashboard],
                              env=self.env, capture_output=True, text=True, timeout=120, cwd=str(REPO))
        if done.returncode != 0:
            raise RuntimeError(f"serve deploy {path} failed ({done.returncode}): {done.stderr[-2000:]}")

    def wait_healthy(self, timeout_s: float = 180) -> dict[str, Any]:
        """Poll ``GET /healthz`` until it answers 200; returns its JSON."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"{self.http}/healthz", timeout=5)
                if response.status_code == 200:
                    return response.json()
                last = f"{response.status_code} {response.text[:200]}"
            except requests.RequestException as err:
                last = repr(err)
            time.sleep(1.0)
        raise TimeoutError(f"/healthz not healthy after {timeout_s} s (last: {last}); logs in {self.temp_dir}")

    def model_replicas(self) -> list[dict[str, Any]]:
        """Alive DDPMModel replica actors as dicts with actor_id, pid, name (Ray state API)."""
        # Imported here on purpose: Ray reads RAY_AUTH_MODE when it is first imported, and conftest.py
        # imports this module before pytest_configure sets the session's token authentication.
        from ray.util.state import list_actors

        actors = list_actors(address=self.dashboard, filters=[("state", "=", "ALIVE")], limit=1000)
        return [{"actor_id": a.actor_id, "pid": a.pid, "name": a.name} for a in actors
                if a.class_name.endswith("DDPMModel") or "DDPMModel" in (a.name or "")]

    def cpu_seconds(self) -> dict[int, float]:
        """CPU seconds (user + system, all threads) used so far by every process of the cluster, by pid."""
        try:
            family = [psutil.Process(self.process.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        used = {}
        for process in family:
            try:
                times = process.cpu_times()
                used[process.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return used

    def stop(self) -> None:
        """End the cluster: SIGTERM to ``ray start --block`` and all its descendants, SIGKILL to
        whatever is left after 3 s, then remove the temp dir."""
        try:
            family = [psutil.Process(self.process.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for process in family:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=3)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def derive_serve_config(tracking_uri: str, cluster: LocalRayCluster, model_uri: str, limits: dict[str, int],
                        max_replicas: int = 1, max_batch_size: int | None = None) -> dict[str, Any]:
    """``deploy/serve_config.yaml`` adapted to ``cluster``: its HTTP port, the MLflow store
    ``tracking_uri``, ``model_uri``, ``limits`` (merged into the YAML's), 1 to ``max_replicas``
    model replicas of 1 CPU each, and ``max_batch_size`` when given."""
    config = copy.deepcopy(yaml.safe_load(SERVE_CONFIG.read_text()))
    config["http_options"] = {"host": "127.0.0.1", "port": cluster.http_port}
    application = config["applications"][0]
    application["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}}
    deployments = {d["name"]: d for d in application["deployments"]}
    model = deployments["DDPMModel"]
    model["user_config"]["model_uri"] = model_uri
    if max_batch_size is not None:
        model["user_config"]["max_batch_size"] = max_batch_size
    model["autoscaling_config"].update(min_replicas=1, max_replicas=max_replicas, upscale_delay_s=2)
    model["ray_actor_options"]["num_cpus"] = 1
    deployments["DDPMIngress"]["user_config"]["limits"].update(limits)
    return config
