"""train.max_minutes: the wall-time budget ends a run at a log step, on every rank at once, with a
checkpoint that carries the training time (so a resumed run keeps counting it) and a registered model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from _train_helpers import checkpoint_states, tiny_config
from mlflow import MlflowClient

from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.launcher import run
from pipelines.training.loop import MODEL_STEP_TAG, MODEL_URI_TAG
from pipelines.training.time_budget import TimeBudget


def test_budget_counts_earlier_attempts_and_zero_means_none() -> None:
    assert not TimeBudget(0.0, seconds_before=1e9).spent(world_size=1)
    assert TimeBudget(1.0, seconds_before=60.0).spent(world_size=1)  # the resumed run had used it all
    fresh = TimeBudget(1.0, seconds_before=30.0)
    assert not fresh.spent(world_size=1) and 30.0 <= fresh.seconds() < 31.0
    short = TimeBudget(0.5 / 60)  # half a second
    time.sleep(0.6)
    assert short.spent(world_size=1)


def test_config_refuses_a_negative_or_infinite_budget(fmnist_shards: Path, tmp_path: Path) -> None:
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="train.max_minutes"):
            tiny_config(fmnist_shards, tmp_path, "bad", train__max_minutes=bad)


@pytest.mark.slow
def test_two_workers_stop_together_when_the_budget_is_spent(ray_local, fmnist_shards: Path, train_sandbox: Path) -> None:
    # 0.001 min = 60 ms: spent by the end of the first step, checked at the first log step (step 1)
    config = tiny_config(fmnist_shards, train_sandbox / "runs", "budget", scaling__num_workers=2,
                         train__total_steps=50, train__max_minutes=0.001, train__fd_every=0)
    outcome = run(config)
    assert outcome["metrics"]["step"] == 1
    checkpoint = Path(outcome["checkpoint"])
    assert checkpoint.name == "checkpoint_00000001"
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 1 and state["train_seconds"] >= 0.06
    tags = MlflowClient(resolve_tracking_uri()).get_run(outcome["mlflow_run_id"]).data.tags
    assert tags[MODEL_STEP_TAG] == "1" and tags[MODEL_URI_TAG]  # finalized as at total_steps
    again = run(config)  # re-submitted: the restored training time is already over the budget
    assert again["mlflow_run_id"] == outcome["mlflow_run_id"] and again["resumed"]
    assert list(checkpoint_states(Path(outcome["run_folder"]))) == [1]  # no step was added
