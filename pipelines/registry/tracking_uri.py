"""Where MLflow lives: the tracking URI and the artifact folder of an experiment.

One rule for the whole project: ``MLFLOW_TRACKING_URI`` when set, else an absolute SQLite file
in the project folder (``<repo>/mlflow.db``) with artifacts in ``<repo>/mlartifacts``. MLflow 3
refuses a ``./mlruns`` file store, and a SQLite store would otherwise put artifacts in a
``./mlruns`` folder relative to whatever the current directory is, so experiments are created
with an explicit artifact location next to the database.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient

from pipelines.paths import DEFAULT_TRACKING_DB

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri() -> str:
    """The MLflow tracking (and registry) URI: ``$MLFLOW_TRACKING_URI`` if set and non-empty,
    else ``sqlite:///<project folder>/mlflow.db`` (an absolute path)."""
    uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    return uri or f"sqlite:///{DEFAULT_TRACKING_DB}"


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
    """Return the id of experiment ``name``, creating it (with ``default_artifact_location``) if
    it does not exist yet.

    Raises:
        ValueError: if ``name`` is empty, or the experiment exists but was deleted.
    """
    if not name:
        raise ValueError("experiment name must be a non-empty string")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    if experiment.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
    return experiment.experiment_id
