"""Helpers shared by the training tests (configs, checkpoint states, ports); fixtures are in conftest.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
