"""The FD's feature networks as MLflow models: log/register a weights folder, fetch it back.

A feature network folder holds ``model.safetensors`` + ``config.json`` (the project's checkpoint
file names; e.g. ``pipelines.evaluation.classifier.save_classifier``). It is logged as a pyfunc with
MLflow's models-from-code: the caller names the entry file (the registry does not know the
network's code), and the folder is the pyfunc's one artifact ``"weights"``; nothing is pickled.
Fetching needs no pyfunc: ``fetch_feature_net`` downloads the files and returns their folder.

Downloaded layout of ``models:/<name>/<version>``::

    <dst>/MLmodel, <entry>.py, requirements.txt, ...
    <dst>/artifacts/weights/{model.safetensors, config.json}
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import mlflow
from mlflow import MlflowClient

from diffusion_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from pipelines.registry.model_store import ModelRef, _pip_requirements, fetch_checkpoint, quiet_artifact_transfers
from pipelines.registry.tracking_uri import ensure_experiment, mlflow_store, resolve_tracking_uri

FEATURE_MODEL_NAME = "fd_classifier"


def log_feature_net(
    folder: str | Path, entry_file: str | Path, *, name: str = FEATURE_MODEL_NAME,
    registered_model_name: str | None = None, tags: Mapping[str, str] | None = None,
) -> ModelRef:
    """Log ``folder`` (``model.safetensors`` + ``config.json``) as the pyfunc ``name`` of the active
    run, registering it under ``registered_model_name`` when given.

    Args:
        entry_file: the models-from-code file whose ``mlflow.models.set_model`` names the pyfunc.
        tags: tags of the registered version (e.g. the training data's ``source_checksum``).

    Returns:
        A ``ModelRef`` (``models:/<name>/<version>`` when registered, else ``runs:/<run>/<name>``).

    Raises:
        RuntimeError: if no MLflow run is active; FileNotFoundError: if a file is missing.
    """
    quiet_artifact_transfers()
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_feature_net must be called inside an active MLflow run (mlflow.start_run)")
    source = Path(folder)
    for file in (WEIGHTS_NAME, CONFIG_NAME):
        if not (source / file).is_file():
            raise FileNotFoundError(f"feature network folder {source.resolve()} has no {file}")
    if not Path(entry_file).is_file():
        raise FileNotFoundError(f"pyfunc entry file {Path(entry_file).resolve()} does not exist")
    with tempfile.TemporaryDirectory(prefix="fd-net-") as tmp:
        staged = Path(tmp) / "weights"
        staged.mkdir()
        for file in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copy2(source / file, staged / file)
        info = mlflow.pyfunc.log_model(name=name, python_model=str(entry_file), artifacts={"weights": str(staged)},
                                       pip_requirements=_pip_requirements())
    if registered_model_name is None:
        return ModelRef(model_uri=f"runs:/{run.info.run_id}/{name}", run_id=run.info.run_id)
    version = mlflow.register_model(info.model_uri, registered_model_name,
                                    tags={"source_run_id": run.info.run_id, **(tags or {})})
    return ModelRef(model_uri=f"models:/{registered_model_name}/{version.version}", run_id=run.info.run_id,
                    name=registered_model_name, version=str(version.version))


def fetch_feature_net(uri: str, dst: str | None = None) -> Path:
    """A local folder with the feature network's ``model.safetensors`` + ``config.json``, for any
    reference ``model_store.fetch_checkpoint`` takes (``models:/...``, ``runs:/...``, ``s3://...``,
    a local folder).

    Raises:
        ValueError: on an unsupported URI; FileNotFoundError: if nothing is found there.
    """
    return fetch_checkpoint(uri, dst)


def log_feature_net_run(
    folder: str | Path, entry_file: str | Path, *, experiment: str, run_name: str,
    params: Mapping[str, object], metrics: Mapping[str, float], registered_model_name: str | None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, str, ModelRef]:
    """One MLflow run (project tracking URI) holding a trained feature network: ``params``,
    ``metrics``, ``tags`` and the model (``log_feature_net``), registered when a name is given.

    Returns:
        ``(tracking_uri, run_id, ModelRef)``.
    """
    tracking_uri = resolve_tracking_uri()
    experiment_id = ensure_experiment(MlflowClient(tracking_uri), experiment, tracking_uri)
    with mlflow_store(tracking_uri), \
            mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics(dict(metrics))
        ref = log_feature_net(folder, entry_file, registered_model_name=registered_model_name, tags=tags)
    return tracking_uri, run.info.run_id, ref
