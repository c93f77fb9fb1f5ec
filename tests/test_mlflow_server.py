"""The session's training runs, seen through a real ``mlflow server`` on loopback (REST API)."""

from __future__ import annotations

import pytest
import requests
from _train_helpers import EXPERIMENT, REGISTERED_MODEL

from pipelines.registry.tracking_uri import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, run_location, run_url

pytestmark = pytest.mark.slow


def _api(base: str, method: str, path: str, **kwargs) -> dict:
    response = requests.request(method, f"{base}/api/2.0/mlflow/{path}", timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def _runs_by_name(base: str) -> dict[str, dict]:
    experiment = _api(base, "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})["experiment"]
    runs = _api(base, "POST", "runs/search", json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    return {r["info"]["run_name"]: r for r in runs["runs"]}


def test_experiment_is_tagged_for_model_training(mlflow_server: str, tiny_runs) -> None:
    experiment = _api(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})
    tags = {t["key"]: t["value"] for t in experiment["experiment"].get("tags", [])}
    assert tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND, tags


def test_printed_run_link_is_the_runs_ui_page(mlflow_server: str, tiny_runs) -> None:
    run = _runs_by_name(mlflow_server)["ddp-2"]["info"]
    expected = f"{mlflow_server}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}?workflowType=machine_learning"
    assert run_location(mlflow_server, run["run_id"]) == run_url(mlflow_server, run["experiment_id"], run["run_id"]) == expected


def test_server_lists_run_with_params_metrics_and_samples(mlflow_server: str, tiny_runs) -> None:
    run = _runs_by_name(mlflow_server)["ddp-2"]
    assert run["info"]["run_id"] == tiny_runs[2].outcome["mlflow_run_id"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == tiny_runs[2].config.flat_params()
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert {"loss", "loss_q3", "lr", "grad_norm", "images_per_s", "val_bpd", "val_bpd_exact"} <= set(metrics)
    history = _api(mlflow_server, "GET", "metrics/get-history",
                   params={"run_id": run["info"]["run_id"], "metric_key": "loss"})
    assert sorted(m["step"] for m in history["metrics"]) == list(range(1, 5))

    listed = _api(mlflow_server, "GET", "artifacts/list", params={"run_id": run["info"]["run_id"], "path": "samples"})
    paths = [f["path"] for f in listed["files"]]
    assert paths == ["samples/step_00000002.png", "samples/step_00000004.png"]
    png = requests.get(f"{mlflow_server}/get-artifact", params={"path": paths[-1], "run_uuid": run["info"]["run_id"]},
                       timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_server_lists_registered_model_versions(mlflow_server: str, tiny_runs) -> None:
    models = _api(mlflow_server, "GET", "registered-models/search", params={"filter": f"name = '{REGISTERED_MODEL}'"})
    assert [m["name"] for m in models["registered_models"]] == [REGISTERED_MODEL]
    versions = _api(mlflow_server, "GET", "model-versions/search", params={"filter": f"name = '{REGISTERED_MODEL}'"})
    by_run = {v["run_id"]: v for v in versions["model_versions"]}
    for workers in (2, 1):
        outcome = tiny_runs[workers].outcome
        assert outcome["mlflow_run_id"] in by_run, f"no model version from the {workers}-worker run"


def test_two_runs_with_different_configs_are_comparable(mlflow_server: str, tiny_runs) -> None:
    runs = _runs_by_name(mlflow_server)
    params = [{p["key"]: p["value"] for p in runs[name]["data"]["params"]} for name in ("ddp-2", "ddp-1")]
    assert params[0].keys() == params[1].keys()
    differing = {k for k in params[0] if params[0][k] != params[1][k]}
    assert differing == {"scaling.num_workers", "train.run_name"}
    assert (params[0]["scaling.num_workers"], params[1]["scaling.num_workers"]) == ("2", "1")
