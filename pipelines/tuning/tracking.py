"""The sweep in MLflow: one parent run per sweep, one child run per trial (tag ``mlflow.parentRunId``,
which the MLflow UI uses to nest the children under the parent).

* ``open_parent`` creates the parent run (the spec as params, the sweep YAML and base config as
  artifacts), or finds it again by its ``ddpm.sweep`` tag when the sweep is resumed.
* A trial's child run is the training run itself (``training.launcher.run`` with ``parent_run_id``);
  a restarted trial finds it again through its run folder (``registry.runs.open_run``).
* ``SweepTracker``, a Tune callback on the sweep's driver, tags each child with how its trial ended
  (``finished``, ``stopped_early`` by the scheduler, ``failed`` with the error) and gives it its
  terminal status; a trial that failed before its run was opened (an invalid combination) gets a
  child run of its own holding the sampled values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag
from ray import tune

from pipelines.registry.runs import PARENT_RUN_TAG
from pipelines.registry.tracking_uri import mlflow_store

SWEEP_TAG = "ddpm.sweep"
"""The sweep's name, on the parent and every child."""
ROLE_TAG = "ddpm.sweep_role"
"""``parent`` or ``trial``."""
TRIAL_TAG = "ddpm.trial_id"
"""The Tune trial id of a child run."""
VARIANT_TAG = "ddpm.variant"
"""The spec variant a trial ran (when the spec has variants)."""
OUTCOME_TAG = "ddpm.trial_outcome"
"""``finished``, ``stopped_early`` (by the scheduler) or ``failed``."""
ERROR_TAG = "ddpm.trial_error"
"""The exception line of a failed trial."""
BEST_TRIAL_TAG = "ddpm.best_trial_id"
BEST_RUN_TAG = "ddpm.best_run_id"
BEST_METRIC_PREFIX = "best_"
_MAX_TAG = 5000  # MLflow keeps tag values up to 8000 characters


def find_parent(client: MlflowClient, experiment_id: str, sweep_name: str) -> Run | None:
    """The parent run of sweep ``sweep_name`` in the experiment, or ``None``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_name}' and "
                                                            f"tags.`{ROLE_TAG}` = 'parent'", max_results=1)
    return runs[0] if runs else None


def open_parent(client: MlflowClient, experiment_id: str, sweep_name: str, params: Mapping[str, str],
                artifacts: Mapping[str, str]) -> tuple[str, bool]:
    """The sweep's parent run: found again by name (resume), else created with ``params`` and the
    text ``artifacts`` (``{artifact_file: text}``). Returns ``(run_id, found)``."""
    found = find_parent(client, experiment_id, sweep_name)
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, True
    run = client.create_run(experiment_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name, ROLE_TAG: "parent"})
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    for artifact_file, text in artifacts.items():
        client.log_text(run_id, text, artifact_file)
    return run_id, False


def child_tags(sweep_name: str, trial_id: str, variant: str | None) -> dict[str, str]:
    """The tags a trial's child run is created with (besides ``mlflow.parentRunId``)."""
    return {SWEEP_TAG: sweep_name, ROLE_TAG: "trial", TRIAL_TAG: trial_id, **({VARIANT_TAG: variant} if variant else {})}


def children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every child run of the parent, oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_child(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> Run | None:
    """The child run of trial ``trial_id`` under the parent, or ``None``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and "
                                                            f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0] if runs else None


def error_line(text: str) -> str:
    """The last non-empty line of a traceback (the exception and its message), capped for a tag."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:_MAX_TAG]


class SweepTracker(tune.Callback):
    """A Tune callback (on the sweep's driver) that records how each trial ended in its child run.

    Args:
        tracking_uri: MLflow's URI.
        experiment_id: the experiment of the parent and children.
        parent_run_id: the sweep's parent run.
        sweep_name: the sweep's name (tag of a child made here).
        searched: the ``section.key`` names the trials sample (params of a child made here).
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str,
                 searched: tuple[str, ...]) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.searched = searched

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial whose training returned is ``finished`` (``training.launcher.run`` ended its run
        FINISHED before the trial function returned); one the scheduler stopped is ``stopped_early``
        (Tune marks both results ``done``; the stopped trial's processes were killed with its run
        still RUNNING), and its run ends KILLED."""
        run = find_child(MlflowClient(self.tracking_uri), self.experiment_id, self.parent_run_id, trial.trial_id)
        finished = run is not None and run.info.status == "FINISHED"
        self.record(trial, "finished" if finished else "stopped_early", "FINISHED" if finished else "KILLED")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial that raised is ``failed``, with the exception line of its error file (Tune writes
        it in the trial's local folder before this call; its copy in storage comes later)."""
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local is not None and local.is_file() else ""
        self.record(trial, "failed", "FAILED", error_line(text))

    def record(self, trial: Any, outcome: str, status: str, error: str | None = None) -> None:
        """Tag the child run of ``trial`` (made here when the trial never opened one) and end it."""
        client = MlflowClient(self.tracking_uri)
        run = find_child(client, self.experiment_id, self.parent_run_id, trial.trial_id)
        if run is None:
            run_id = self._make_child(client, trial)
        else:
            run_id = run.info.run_id
        tags = {OUTCOME_TAG: outcome, **({ERROR_TAG: error} if error else {})}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, status=status)

    def _make_child(self, client: MlflowClient, trial: Any) -> str:
        config = dict(trial.config or {})
        variant = config.get("variant")
        tags = {**child_tags(self.sweep_name, trial.trial_id, variant), PARENT_RUN_TAG: self.parent_run_id}
        run = client.create_run(self.experiment_id, run_name=f"{self.sweep_name}-{trial.trial_id}", tags=tags)
        params = [Param(k, str(config[k])) for k in self.searched if k in config]
        if params:
            client.log_batch(run.info.run_id, params=params)
        return run.info.run_id


def register_model(tracking_uri: str, model_uri: str, name: str) -> str:
    """Register ``model_uri`` (a child run's logged model, its ``ddpm.model_uri`` tag) as a new
    version of ``name`` in the registry at ``tracking_uri`` (made this process's tracking and
    registry URI for the call only: ``mlflow_store``); returns ``models:/<name>/<version>``."""
    with mlflow_store(tracking_uri):
        version = mlflow.register_model(model_uri, name)
    return f"models:/{name}/{version.version}"
