"""Helpers shared by the training tests (configs, checkpoint states, ports, the loss a step backpropagates);
fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from pipelines.training.config import TrainConfig, load_config
from tooling.local_cluster import free_port  # noqa: F401  (re-exported for the tests)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.yaml"
#: --limit and --val-fraction of the test shards: 66 training images (one global batch = one
#: epoch, so any split of it over workers covers the same images) and 14 validation images.
SHARD_LIMIT, SHARD_VAL_FRACTION, TRAIN_IMAGES = 80, 0.2, 66
EXPERIMENT = "ddpm-test"
REGISTERED_MODEL = "ddpm-test"

#: Overrides that make configs/tiny_cpu.yaml run in seconds: 4 steps, everything logged each step.
FAST = {
    "train.total_steps": 4,
    "train.global_batch_size": TRAIN_IMAGES,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.sample_every": 2,
    "train.sample_images": 4,
    "train.sample_steps": 4,
    "train.bpd_every": 2,
    "train.bpd_images": 8,
    "train.bpd_samples": 2,
    "train.final_bpd_images": 2,
    "scaling.torch_threads": 1,
    "scaling.max_failures": 0,
    "tracking.experiment_name": EXPERIMENT,
    "tracking.registered_model_name": REGISTERED_MODEL,
}


def fd_overrides(classifier: Path) -> dict[str, Any]:
    """``tiny_config`` keywords for the FD during training: 12 samples (the val split holds 14, for
    the floor) at steps 2 and 4, scored by the classifier folder ``classifier``."""
    return {"train__fd_every": 2, "train__fd_images": 12, "train__fd_classifier": str(classifier)}


def tiny_config(shards: Path, storage: Path, run_name: str, **overrides: Any) -> TrainConfig:
    """configs/tiny_cpu.yaml with ``FAST`` and ``overrides`` (``section__key=value``) applied."""
    extra = {key.replace("__", "."): value for key, value in overrides.items()}
    config = load_config(TINY_CONFIG)
    return config.replace({**FAST, "data.shards": str(shards), "train.storage_path": str(storage),
                           "train.run_name": run_name, **extra})


def checkpoint_states(run_folder: Path) -> dict[int, dict[str, Any]]:
    """``{step: train_state.json}`` of every checkpoint Ray Train kept in a run folder."""
    states = (json.loads((p / "train_state.json").read_text()) for p in Path(run_folder).glob("checkpoint_0*"))
    return {state["step"]: state for state in sorted(states, key=lambda s: s["step"])}


@dataclass(frozen=True)
class TinyRun:
    """One finished training run of the session: its config and what ``pipelines.training.launcher.run``
    returned."""

    config: TrainConfig
    outcome: dict[str, Any]


@contextmanager
def recording_backward() -> Iterator[list[torch.Tensor]]:
    """Record every tensor ``.backward()`` is called on inside the block (``torch.Tensor.backward``
    patched, the real backward still run; the patch undone on exit, also on an error).

    Yields the list the block fills, one detached clone per call: a ``train_step`` inside the block
    leaves there the scalar it backpropagated, which the tests compare with the loss formula
    (weightings, importance weights) recomputed from the per-example losses, as the returned
    losses alone would not show what was averaged into the gradient."""
    backpropagated: list[torch.Tensor] = []
    real_backward = torch.Tensor.backward

    def recording(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        backpropagated.append(self.detach().clone())
        return real_backward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "backward", recording)
        yield backpropagated


class ManualClock:
    """A monotonic clock (seconds) that moves only when a test sets ``now``: for ``TimeBudget`` and
    ``ProgressLog``, whose ``clock`` argument it replaces."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def budget_verdict_on_rank(rank: int, world_size: int, init_method: str, seconds: list[float], verdicts: Any) -> None:
    """One process of a gloo group: a 1-minute ``TimeBudget`` whose clock says ``seconds[rank]``
    have passed; puts ``(rank, budget.spent(world_size))`` on the queue ``verdicts``."""
    from datetime import timedelta

    import torch.distributed as dist

    from pipelines.training.time_budget import TimeBudget

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        clock = ManualClock()
        budget = TimeBudget(1.0, clock=clock)
        clock.now += seconds[rank]
        verdicts.put((rank, budget.spent(world_size)))
    finally:
        dist.destroy_process_group()


def frozen_clock_off_rank_0(loop_config: dict[str, Any]) -> None:
    """``training.loop.train_func`` with the real clock on rank 0 and a clock that never moves on the
    other ranks: by their own clocks they never spend a budget, so they stop only by rank 0's
    verdict. Pickled by value into the Ray Train workers (``ray.cloudpickle.register_pickle_by_value``)."""
    import time

    import ray.train

    from pipelines.training.loop import train_func

    rank = ray.train.get_context().get_world_rank()
    train_func(loop_config, clock=time.monotonic if rank == 0 else ManualClock())


def run_train_cli(storage: Path, run_name: str, overrides: dict[str, Any],
                  timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``python pipelines/train.py --config configs/tiny_cpu.yaml --num-cpus 2`` in a subprocess with no
    ``RAY_ADDRESS`` (so it starts its own local Ray instance, as a user's first command does), the
    test session's MLflow store and Ray token, and ``overrides`` (``{"section.key": value}``, written
    as YAML-parsed ``key=value`` arguments) over ``train.storage_path`` and ``train.run_name``.
    Returns the finished process (stdout and stderr as text)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    args = [f"{key}={json.dumps(value) if value is None or isinstance(value, list) else value}"
            for key, value in {"train.storage_path": storage, "train.run_name": run_name, **overrides}.items()]
    command = [sys.executable, "pipelines/train.py", "--config", str(TINY_CONFIG.relative_to(REPO_ROOT)),
               "--num-cpus", "2", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
