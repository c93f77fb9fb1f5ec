"""train.max_minutes: the wall-time budget ends a run at a log step, on every rank at once, with a
checkpoint that carries the training time (so a resumed run keeps counting it) and a registered model."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import _train_helpers
import pytest
import ray.cloudpickle
from _train_helpers import ManualClock, budget_verdict_on_rank, checkpoint_states, free_port, tiny_config
from mlflow import MlflowClient

from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.launcher import run
from pipelines.training.tags import MODEL_STEP_TAG, MODEL_URI_TAG
from pipelines.training.time_budget import TimeBudget


def test_budget_counts_earlier_attempts_and_zero_means_none() -> None:
    clock = ManualClock()
    assert not TimeBudget(0.0, seconds_before=1e9, clock=clock).spent(world_size=1)
    assert TimeBudget(1.0, seconds_before=60.0, clock=clock).spent(world_size=1)  # the resumed run had used it all
    fresh = TimeBudget(1.0, seconds_before=30.0, clock=clock)
    clock.now += 0.25
    assert not fresh.spent(world_size=1) and fresh.seconds() == 30.25
    assert fresh.ends_at() == clock.now - 0.25 + 30.0  # 30 s of the budget were left at the start
    short = TimeBudget(0.5 / 60, clock=clock)  # half a second
    clock.now += 0.49
    assert not short.spent(world_size=1)
    clock.now += 0.01
    assert short.spent(world_size=1)
    short.start()  # a new attempt's clock starts at zero
    assert short.seconds() == 0.0 and not short.spent(world_size=1)


@pytest.mark.parametrize("seconds, verdict", [([61.0, 0.0], True), ([0.0, 61.0], False)],
                         ids=["rank-0-spent", "rank-1-spent"])
def test_every_rank_takes_rank_0s_verdict(seconds: list[float], verdict: bool) -> None:
    # two gloo processes whose clocks disagree about a 1-minute budget: both answer as rank 0's clock does
    context = multiprocessing.get_context("fork")  # the children only build a budget and broadcast
    verdicts = context.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    processes = [context.Process(target=budget_verdict_on_rank, args=(rank, 2, init_method, seconds, verdicts))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    assert sorted(verdicts.get(timeout=5) for _ in processes) == [(0, verdict), (1, verdict)]


def test_config_refuses_a_negative_or_infinite_budget(fmnist_shards: Path, tmp_path: Path) -> None:
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="train.max_minutes"):
            tiny_config(fmnist_shards, tmp_path, "bad", train__max_minutes=bad)


@pytest.mark.slow
def test_two_workers_stop_together_when_the_budget_is_spent(ray_local, fmnist_shards: Path, train_sandbox: Path) -> None:
    # 0.001 min = 60 ms: spent by the end of the first step by rank 0's clock, checked at the first
    # log step (step 1); rank 1's clock never moves, so by its own count the budget is never spent
    # and it stops there only by rank 0's broadcast verdict (else it would wait in the next all-reduce)
    config = tiny_config(fmnist_shards, train_sandbox / "runs", "budget", scaling__num_workers=2,
                         train__total_steps=50, train__max_minutes=0.001, train__fd_every=0)
    ray.cloudpickle.register_pickle_by_value(_train_helpers)  # the workers cannot import tests/
    try:
        outcome = run(config, train_loop=_train_helpers.frozen_clock_off_rank_0)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(_train_helpers)
    assert outcome["metrics"]["step"] == 1
    checkpoint = Path(outcome["checkpoint"])
    assert checkpoint.name == "checkpoint_00000001"
    state = json.loads((checkpoint / "train_state.json").read_text())
    assert state["step"] == 1 and state["train_seconds"] >= 0.06
    assert [r["rank"] for r in state["replicas"]] == [0, 1]  # both ranks wrote their part of step 1's checkpoint
    tags = MlflowClient(resolve_tracking_uri()).get_run(outcome["mlflow_run_id"]).data.tags
    assert tags[MODEL_STEP_TAG] == "1" and tags[MODEL_URI_TAG]  # finalized as at total_steps
    again = run(config)  # re-submitted: the restored training time is already over the budget
    assert again["mlflow_run_id"] == outcome["mlflow_run_id"] and again["resumed"]
    assert list(checkpoint_states(Path(outcome["run_folder"]))) == [1]  # no step was added
