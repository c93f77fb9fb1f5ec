"""Where MLflow lives: the tracking URI and the artifact folder of an experiment.

One rule for the whole project: ``MLFLOW_TRACKING_URI`` when set, else an absolute SQLite file
in the project folder (``<repo>/mlflow.db``) with artifacts in ``<repo>/mlartifacts``. MLflow 3
refuses a ``./mlruns`` file store, and a SQLite store would otherwise put artifacts in a
``./mlruns`` folder relative to whatever the current directory is, so experiments are created
with an explicit artifact location next to the database.

Experiments are tagged as MLflow 3's classical-training kind (``EXPERIMENT_KIND_TAG`` =
``custom_model_development``), so the UI opens them on the training view (runs, metric charts,
models) instead of the GenAI one (traces); ``run_url`` builds the UI link of a run on that view.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient

from pipelines.common.paths import DEFAULT_TRACKING_DB

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: MLflow's registry URI variable; ``mlflow.set_registry_uri`` writes it for subprocesses.
REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"
#: MLflow 3's experiment-kind tag and its value for classical model training (the UI reads it).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: The UI's query parameter that selects the training view (MLflow 3.17: ``workflowType``).
UI_VIEW_QUERY = "workflowType=machine_learning"


def resolve_tracking_uri() -> str:
    """The MLflow tracking (and registry) URI: ``$MLFLOW_TRACKING_URI`` if set and non-empty,
    else ``sqlite:///<project folder>/mlflow.db`` (an absolute path)."""
    uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    return uri or f"sqlite:///{DEFAULT_TRACKING_DB}"


@contextmanager
def mlflow_store(tracking_uri: str) -> Iterator[None]:
    """Make ``tracking_uri`` this process's MLflow tracking *and* registry URI inside the block,
    for MLflow's fluent API (``mlflow.start_run``, ``mlflow.register_model``, ...).

    Both URIs, and the ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` variables MLflow writes with
    them (child processes inherit those), are put back as they were when the block ends, also on
    an exception: a registry URI left behind would send a later registration in the same process,
    or any process it starts, to the wrong store.
    """
    previous_tracking = os.environ.get(TRACKING_URI_ENV)
    previous_registry = os.environ.get(REGISTRY_URI_ENV)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        # Clear MLflow's own globals, then put the variables back: MLflow reads a variable when
        # its global is unset, so the process resolves both URIs as it did before the block.
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]  # MLflow's unset state; "" would pin it
        for name, value in ((TRACKING_URI_ENV, previous_tracking), (REGISTRY_URI_ENV, previous_registry)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact folder for new experiments of a ``sqlite:///`` store: ``mlartifacts`` beside the
    database file (absolute). ``None`` for other stores (a tracking server decides itself).

    Raises:
        ValueError: for a relative or in-memory SQLite URI, whose folder is ambiguous.
    """
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = tracking_uri.removeprefix("sqlite:///")
    if path == tracking_uri or not path or path == ":memory:" or not os.path.isabs(path):
        raise ValueError(
            f"tracking URI {tracking_uri!r} must be an absolute sqlite:///<path> "
            "(e.g. sqlite:////abs/path/mlflow.db)"
        )
    return str(Path(path).parent / "mlartifacts")


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """Return the id of experiment ``name``, creating it (with ``default_artifact_location`` and
    the tag ``EXPERIMENT_KIND_TAG`` = ``EXPERIMENT_KIND``) if it does not exist yet; an existing
    experiment without that tag gets it (one with another kind is left as it is).

    Raises:
        ValueError: if ``name`` is empty, or the experiment exists but was deleted.
    """
    if not name:
        raise ValueError("experiment name must be a non-empty string")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def ui_base_url(tracking_uri: str) -> str | None:
    """The MLflow UI's base URL when ``tracking_uri`` is a tracking server (``http(s)://``, without a
    trailing slash), else ``None`` (a ``sqlite:`` or other store has no UI until ``mlflow server``
    serves it)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return tracking_uri.rstrip("/")


def run_url(ui_base: str, experiment_id: str, run_id: str) -> str:
    """The UI page of run ``run_id`` on the training view:
    ``<ui_base>/#/experiments/<experiment_id>/runs/<run_id>?workflowType=machine_learning``.

    Args:
        ui_base: the UI's base URL (an ``http(s)://`` tracking URI, with or without a trailing slash).

    Raises:
        ValueError: if ``ui_base`` is not an ``http(s)://`` URL, or an id is empty.
    """
    base = ui_base_url(ui_base)
    if base is None:
        raise ValueError(f"MLflow UI base {ui_base!r} must be an http:// or https:// URL")
    if not experiment_id or not run_id:
        raise ValueError(f"experiment id {experiment_id!r} and run id {run_id!r} must be non-empty")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW_QUERY}"


def run_location(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    """Where to look at a run, as the entry points print it after ``MLflow run <id> at``: its
    ``run_url`` when ``tracking_uri`` is a tracking server (the experiment id looked up there when
    not given), else ``tracking_uri`` itself."""
    base = ui_base_url(tracking_uri)
    if base is None:
        return tracking_uri
    if experiment_id is None:
        experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return run_url(base, experiment_id, run_id)
