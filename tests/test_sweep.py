"""pipelines/sweep.py on a real local Ray cluster with a real MLflow SQLite store: a tiny ASHA sweep
(parent and child runs, a trial stopped early, a trial whose combination is invalid, the best config
file), and a driver killed mid-sweep then resumed with ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from _sweep_helpers import ASHA_NAME, ASHA_SWEEP, QUICK, SweepOutcome, cli_args, sweep_runs, write_sweep
from _train_helpers import REPO_ROOT
from mlflow import MlflowClient

from pipelines import sweep
from pipelines.registry.runs import PARENT_RUN_TAG
from pipelines.registry.tracking_uri import resolve_tracking_uri
from pipelines.training.config import TrainConfig
from pipelines.tuning.tracking import OUTCOME_TAG, TRIAL_TAG, VARIANT_TAG

pytestmark = pytest.mark.slow


def test_asha_sweep_in_mlflow(asha_sweep: SweepOutcome) -> None:
    assert asha_sweep.status == 0
    storage, out = asha_sweep.storage, asha_sweep.out
    parent, runs = sweep_runs(ASHA_NAME)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.metric"] == "loss" and parent.data.params["sweep.scheduler.name"] == "asha"
    by_variant = {run.data.tags[VARIANT_TAG]: run for run in runs}
    assert sorted(by_variant) == ["frozen", "good", "two_workers"] and len(runs) == 3
    assert all(run.data.tags[PARENT_RUN_TAG] == parent.info.run_id for run in runs)
    good, frozen, bad = by_variant["good"], by_variant["frozen"], by_variant["two_workers"]
    # a trial's run is a train.py run: the whole resolved config as params, its loss history
    assert good.data.params["optimizer.lr"] == "0.01" and good.data.params["train.global_batch_size"] == "33"
    assert good.data.params["train.total_steps"] == "8" and frozen.data.params["optimizer.lr"] == "1e-09"
    assert (good.data.tags[OUTCOME_TAG], good.info.status) == ("finished", "FINISHED")
    assert (frozen.data.tags[OUTCOME_TAG], frozen.info.status) == ("stopped_early", "KILLED")
    assert (bad.data.tags[OUTCOME_TAG], bad.info.status) == ("failed", "FAILED")
    assert "must be divisible by scaling.num_workers=2" in bad.data.tags["ddpm.trial_error"]
    client = MlflowClient(resolve_tracking_uri())
    assert max(m.step for m in client.get_metric_history(good.info.run_id, "loss")) == 8
    assert max(m.step for m in client.get_metric_history(frozen.info.run_id, "loss")) < 8
    # the best trial: its config file, its params, the parent's tags and table
    assert parent.data.tags["ddpm.best_trial_id"] == good.data.tags[TRIAL_TAG]
    assert parent.data.metrics["best_loss"] == pytest.approx(good.data.metrics["loss"])
    best_file = storage / "sweeps" / ASHA_NAME / "best_config.yaml"
    assert f"best config: {best_file}" in out
    best = TrainConfig.from_dict(yaml.safe_load(best_file.read_text()))
    assert best.flat_params() == good.data.params
    table = (storage / "sweeps" / ASHA_NAME / "trials.csv").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("trial_id,variant,train.global_batch_size,loss,outcome")
    # --register-best: a new version of the base config's registered model, made from the best trial's run
    registered = parent.data.tags["ddpm.registered_model_uri"]
    assert f"registered the best model as {registered}" in out
    name, version = registered.removeprefix("models:/").split("/")
    assert name == QUICK["tracking.registered_model_name"]  # the base config's name (trials register nothing)
    assert client.get_model_version(name, version).run_id == good.info.run_id
    # registering pointed MLflow's registry at the sweep's store only for the call: later
    # registrations in this process (and processes it starts) follow their own tracking URI
    assert "MLFLOW_REGISTRY_URI" not in os.environ and mlflow.get_registry_uri() == resolve_tracking_uri()


def test_bad_sweep_refused_before_any_trial(fmnist_shards: Path, train_sandbox: Path, tmp_path: Path, capsys) -> None:
    spec = {**ASHA_SWEEP, "search_space": {"optimizer.lr": {"grid_search": [0.01, 2.0]}}}
    args = cli_args(fmnist_shards, train_sandbox / "refused", write_sweep(tmp_path, "bad", spec), "bad")
    assert sweep.main(args) == 2
    assert "search_space.optimizer.lr: value 2.0 is refused: optimizer.lr=2.0" in capsys.readouterr().err
    assert not (train_sandbox / "refused").exists()


def test_killed_driver_resumes_remaining_trials(ray_local, fmnist_shards: Path, train_sandbox: Path,
                                                tmp_path: Path) -> None:
    spec = {"metric": "loss", "max_concurrent_trials": 1, "budget": {"train.total_steps": 4},
            "search_space": {"optimizer.lr": {"grid_search": [1.0e-3, 2.0e-3]}}}
    storage = train_sandbox / "resume-runs"
    folder = storage / "sweeps" / "resume-test"
    args = cli_args(fmnist_shards, storage, write_sweep(tmp_path, "resume", spec), "resume-test")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    log = (tmp_path / "driver.log").open("wb")
    driver = subprocess.Popen([sys.executable, "pipelines/sweep.py", *args], cwd=REPO_ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        # kill once Tune's saved state (what --resume restores) holds one finished trial of the two
        while time.monotonic() < deadline and driver.poll() is None and terminated(folder) != 1:
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(60)
    finally:
        if driver.poll() is None:
            driver.kill()
    parent, before = sweep_runs("resume-test")
    finished_before = {r.data.tags[TRIAL_TAG]: r for r in before if r.data.tags.get(OUTCOME_TAG) == "finished"}
    assert len(finished_before) == 1 and len(before) <= 2
    resumed_at = int(time.time() * 1000)
    assert sweep.main([*args, "--resume"]) == 0
    parent, after = sweep_runs("resume-test")
    trial_ids = [r.data.tags[TRIAL_TAG] for r in after]
    assert len(after) == 2 and len(set(trial_ids)) == 2  # no duplicate child runs
    assert all(r.data.tags[OUTCOME_TAG] == "finished" and r.info.status == "FINISHED" for r in after)
    assert sorted(r.data.params["optimizer.lr"] for r in after) == ["0.001", "0.002"]
    for trial_id, run in finished_before.items():  # not re-run: the same run, ended before the resume
        again = next(r for r in after if r.data.tags[TRIAL_TAG] == trial_id)
        assert again.info.run_id == run.info.run_id and again.info.end_time < resumed_at
    assert parent.info.status == "FINISHED"


def terminated(folder: Path) -> int:
    """How many trials Tune's latest saved experiment state (``experiment_state-*.json``) holds as
    TERMINATED (0 before it is written)."""
    states = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except (OSError, ValueError):  # being rewritten: ask again
        return 0
    return sum(json.loads(trial[0]).get("status") == "TERMINATED" for trial in data["trial_data"])
