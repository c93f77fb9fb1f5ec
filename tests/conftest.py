"""Shared pytest fixtures: where the real Fashion-MNIST files are, and a sane Ray environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tooling.local_cluster import free_port
from tooling.ray_auth import use_token_auth

REPO_ROOT = Path(__file__).resolve().parents[1]

_FASHION_MNIST_CANDIDATES = (
    os.environ.get("FASHION_MNIST_DIR", ""),
    str(REPO_ROOT.parent / "shared" / "data" / "fashion-mnist"),
    str(REPO_ROOT / "shared" / "data" / "fashion-mnist"),
    "/usr/share/datasets/fashion-mnist",
)


def pytest_configure(config: pytest.Config) -> None:
    # Every Ray cluster the tests start (ray.init(address="local"), `ray start`, LocalRayCluster) uses
    # token authentication, with the caller's RAY_AUTH_TOKEN(_PATH) or a token made for this session.
    use_token_auth()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    # Idle OpenMP threads sleep instead of spinning (read when torch loads, i.e. after this hook):
    # on 2 shared cores, spinning 2-thread torch ops ran ~10x slower than 1 thread.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Folder holding the real Fashion-MNIST IDX .gz files (train-images-idx3-ubyte.gz, ...)."""
    for candidate in _FASHION_MNIST_CANDIDATES:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    pytest.fail(
        "Fashion-MNIST not found; set FASHION_MNIST_DIR or install Debian's dataset-fashion-mnist "
        f"(looked in {[c for c in _FASHION_MNIST_CANDIDATES if c]})"
    )


# ----------------------------------------------------------------------------- training tests
# Session-scoped so that the Ray instance, the shards and the two small training runs are made
# once and shared by test_train_ray.py, test_mlflow_server.py and test_evaluate.py.


@pytest.fixture(scope="session")
def ray_local():
    """An in-process Ray instance of its own (address="local": never someone else's cluster; its node
    address pinned to loopback) with 4 logical CPUs on purpose, so that 2 one-CPU train workers leave Ray Data a CPU. Reuses an
    instance that is already up (and then leaves it up)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fmnist_shards(ray_local, fashion_mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of the first 80 Fashion-MNIST training images made by the real preprocessing
    (66 train / 14 val with the seeded hash split)."""
    from _train_helpers import SHARD_LIMIT, SHARD_VAL_FRACTION, TRAIN_IMAGES

    from pipelines.data.job import PreprocessConfig, run_preprocess

    output = tmp_path_factory.mktemp("fmnist") / "shards"
    manifest = run_preprocess(PreprocessConfig(
        input=str(fashion_mnist_dir / "train-images-idx3-ubyte.gz"), output=str(output),
        limit=SHARD_LIMIT, val_fraction=SHARD_VAL_FRACTION,
    ))
    assert manifest.counts["train"] == TRAIN_IMAGES, manifest.counts
    return output


@pytest.fixture(scope="session")
def train_sandbox(tmp_path_factory: pytest.TempPathFactory):
    """A folder for checkpoints and a SQLite MLflow store, made the process's MLFLOW_TRACKING_URI
    for the session (restored afterwards)."""
    root = tmp_path_factory.mktemp("train")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    yield root
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def fd_classifier_folder(fmnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FD classifier of pipelines/train_classifier.py, one epoch on the session's shards, as a
    folder (not logged to MLflow)."""
    from pipelines.evaluation.classifier_job import ClassifierSettings, train_and_register

    output = tmp_path_factory.mktemp("fd-classifier") / "classifier"
    train_and_register(ClassifierSettings(shards=str(fmnist_shards), output=str(output), epochs=1, log=False))
    return output


@pytest.fixture(scope="session")
def tiny_runs(ray_local, fmnist_shards: Path, train_sandbox: Path, fd_classifier_folder: Path):
    """Two 4-step runs of configs/tiny_cpu.yaml on the same data, seed and global batch: with 2
    gloo workers and with 1, each checkpointing every step and keeping every checkpoint (each one
    records every replica's weights digest and local loss), with the FD of 12 samples at steps 2
    and 4 (``fd_overrides``). Returns ``{num_workers: TinyRun}``."""
    from _train_helpers import FAST, TinyRun, fd_overrides, tiny_config

    from pipelines.training.launcher import run

    runs = {}
    for workers in (2, 1):
        config = tiny_config(fmnist_shards, train_sandbox / "runs", f"ddp-{workers}", scaling__num_workers=workers,
                             train__checkpoint_every=1, train__keep_checkpoints=FAST["train.total_steps"],
                             **fd_overrides(fd_classifier_folder))
        runs[workers] = TinyRun(config=config, outcome=run(config))
    return runs


@pytest.fixture(scope="session")
def mlflow_server(tiny_runs, train_sandbox: Path):
    """``mlflow server`` over the session's SQLite store (after ``tiny_runs``), on 127.0.0.1:<free port>,
    without its job runner; shared by test_mlflow_server.py and test_mlflow_ui.py, stopped at the end."""
    port = free_port()
    log = open(train_sandbox / "mlflow-server.log", "wb")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
         "--default-artifact-root", str(train_sandbox / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(train_sandbox / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def asha_sweep(ray_local, fmnist_shards: Path, train_sandbox: Path, tmp_path_factory: pytest.TempPathFactory):
    """The ASHA sweep of ``_sweep_helpers.ASHA_SWEEP`` (3 trials of the tiny config, one stopped early, one
    failing alone), run once in the session's store: test_sweep.py checks it, test_mlflow_ui.py shows it."""
    from _sweep_helpers import run_asha_sweep

    return run_asha_sweep(fmnist_shards, train_sandbox, tmp_path_factory.mktemp("asha-sweep"))
