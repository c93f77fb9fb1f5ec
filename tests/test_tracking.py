"""MetricBuffer + RunTracker.log_steps against a real MLflow SQLite store: buffered step metrics keep
the time they were measured, not the time they were written."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.registry.runs import TIME_KEY, MetricBuffer, RunTracker
from pipelines.registry.tracking_uri import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ensure_experiment,
    mlflow_store,
    run_location,
    run_url,
)


def test_buffered_metrics_keep_their_measurement_time(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("tracking")).info.run_id
    buffer = MetricBuffer()
    buffer.add(10, {"loss": 1.0})
    time.sleep(0.2)
    buffer.add(20, {"loss": 0.5})
    buffer.add(20, {"grad_norm": 2.0})  # same step later: keeps the step's first time
    time.sleep(0.2)
    written = time.time() * 1000
    tracker = RunTracker(uri, run_id, log_system_metrics=False)
    tracker.log_steps(buffer.take_through(20))
    tracker.log_steps({30: {"loss": 0.25}})  # not buffered: stamped when written

    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [10, 20, 30]
    stamps = [m.timestamp for m in history]
    assert stamps[1] - stamps[0] >= 150
    assert stamps[1] < written - 150
    assert stamps[2] >= int(written)
    assert client.get_metric_history(run_id, "grad_norm")[0].timestamp == stamps[1]
    assert set(client.get_run(run_id).data.metrics) == {"loss", "grad_norm"}  # the time is no metric


def test_pending_entries_carry_their_time_through_a_checkpoint_round_trip() -> None:
    buffer = MetricBuffer()
    buffer.add(5, {"loss": 0.1})
    restored = MetricBuffer(buffer.pending())
    assert restored.pending()[5][TIME_KEY] == buffer.pending()[5][TIME_KEY]
    assert restored.take_through(5)[5]["loss"] == 0.1


def test_experiments_are_tagged_for_model_training(tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    created = ensure_experiment(client, "new", tracking)
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    untagged = client.create_experiment("old", artifact_location=str(tmp_path / "old"))
    assert ensure_experiment(client, "old", tracking) == untagged
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    other = client.create_experiment("genai", artifact_location=str(tmp_path / "g"),
                                     tags={EXPERIMENT_KIND_TAG: "genai_development"})
    ensure_experiment(client, "genai", tracking)
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice stays


def test_run_links_open_the_training_view() -> None:
    assert run_url("http://127.0.0.1:5000/", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_location("https://mlflow.example.com", "abc", "7") == (
        "https://mlflow.example.com/#/experiments/7/runs/abc?workflowType=machine_learning")
    assert run_location("sqlite:////tmp/mlflow.db", "abc", "7") == "sqlite:////tmp/mlflow.db"
    with pytest.raises(ValueError, match="http"):
        run_url("sqlite:////tmp/mlflow.db", "3", "abc")
    with pytest.raises(ValueError, match="non-empty"):
        run_url("http://127.0.0.1:5000", "", "abc")


def test_run_tracker_scopes_the_tracking_and_registry_uri(tmp_path: Path, monkeypatch) -> None:
    """Inside RunTracker (and ``mlflow_store``) the run's store is the fluent API's tracking and
    registry URI; afterwards, also after an error, the process is pointed back where it was and no
    ``MLFLOW_REGISTRY_URI`` is left for later registrations or child processes."""
    outer, inner = (f"sqlite:///{tmp_path / name}.db" for name in ("outer", "inner"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", outer)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    client = MlflowClient(inner)
    run_ids = [client.create_run(ensure_experiment(client, "scoped", inner)).info.run_id for _ in range(2)]

    with RunTracker(inner, run_ids[0], log_system_metrics=False):
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (inner, inner)
        assert os.environ["MLFLOW_REGISTRY_URI"] == inner  # what a child process would inherit
    with pytest.raises(RuntimeError, match="boom"), RunTracker(inner, run_ids[1], log_system_metrics=False):
        raise RuntimeError("boom")

    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (outer, outer)
    assert os.environ["MLFLOW_TRACKING_URI"] == outer and "MLFLOW_REGISTRY_URI" not in os.environ
    assert [client.get_run(r).info.status for r in run_ids] == ["FINISHED", "FAILED"]
    with mlflow_store(inner):
        assert mlflow.get_registry_uri() == inner
    user_registry = f"sqlite:///{tmp_path / 'registry'}.db"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", user_registry)  # a registry chosen by the user survives a block
    with mlflow_store(inner):
        assert mlflow.get_registry_uri() == inner
    assert mlflow.get_registry_uri() == user_registry
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")  # ... and is not pinned in MLflow's globals either
    assert mlflow.get_registry_uri() == outer
