"""Shared pytest fixtures: where the real Fashion-MNIST files are, and a sane Ray environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_FASHION_MNIST_CANDIDATES = (
    os.environ.get("FASHION_MNIST_DIR", ""),
    str(REPO_ROOT.parent / "shared" / "data" / "fashion-mnist"),
    str(REPO_ROOT / "shared" / "data" / "fashion-mnist"),
    "/usr/share/datasets/fashion-mnist",
)


def pytest_configure(config: pytest.Config) -> None:
    # Local test clusters run without token authentication (Ray 2.60 turns it on by default).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


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
