"""Trained DDPM checkpoints as MLflow models: log/register one, and fetch one back as a folder.

The MLflow model named ``"model"`` is a pyfunc logged with MLflow's models-from-code
(``registry/pyfunc_entry.py``; nothing is pickled) whose only artifact is the core checkpoint folder
written by ``diffusion_core.checkpoint.save_checkpoint`` (``model.safetensors`` + ``config.json``,
plus ``manifest.json`` of the training data when given). Fetching needs no pyfunc at all:
``fetch_checkpoint`` downloads the files and returns the folder that holds them, which
``diffusion_core.checkpoint.load_checkpoint`` reads.

Downloaded layout of ``models:/<name>/<version>`` (MLflow 3)::

    <dst>/MLmodel, pyfunc_entry.py, requirements.txt, ...
    <dst>/artifacts/checkpoint/{model.safetensors, config.json, manifest.json}
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import mlflow

from diffusion_core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint_config
from pipelines.data.shards.manifest import MANIFEST_NAME
from pipelines.registry.tracking_uri import resolve_tracking_uri

MODEL_NAME = "model"
#: The models-from-code file of the pyfunc (``mlflow.models.set_model`` of ``DDPMCheckpointModel``).
PYFUNC_ENTRY = Path(__file__).resolve().with_name("pyfunc_entry.py")
_REMOTE_PREFIXES = ("models:/", "runs:/", "s3://", "mlflow-artifacts:/", "file://")


@dataclass(frozen=True)
class ModelRef:
    """Where a logged checkpoint model lives.

    Attributes:
        model_uri: ``models:/<name>/<version>`` when registered, else ``runs:/<run_id>/model``;
            either is accepted by ``fetch_checkpoint``.
        run_id: the MLflow run that logged it.
        name: registered model name, or ``None`` when not registered.
        version: registered version (a string, as MLflow returns it), or ``None``.
    """

    model_uri: str
    run_id: str
    name: str | None = None
    version: str | None = None


_MANIFEST_SUMMARY_KEYS = (
    "schema_version", "image_shape", "counts", "has_labels", "normalization", "source", "source_checksum", "created_at",
    "classes",
)


def quiet_artifact_transfers() -> None:
    """Turn MLflow's artifact progress bars off for this process unless the user set
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``: in a Ray job log a tqdm bar is a block of
    carriage-return lines (``Downloading artifacts: 57%|...``) per model logged or fetched. MLflow
    reads the variable at each transfer, so setting it before one is enough."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def read_manifest_summary(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """Summary of the data manifest beside a fetched checkpoint (``None`` when there is none).

    Keeps schema_version, image_shape, counts, has_labels, normalization, source,
    source_checksum, created_at and classes (the class names, label i = classes[i], which a
    class-conditional model is served with: ``pipelines.registry.class_labels``), and replaces the list of rejected inputs by its length
    (``num_rejected``).

    Raises:
        ValueError: if the manifest exists but is not a JSON object.
    """
    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt data manifest {path.resolve()}: {err}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"data manifest {path.resolve()} must be a JSON object")
    summary = {key: manifest[key] for key in _MANIFEST_SUMMARY_KEYS if key in manifest}
    summary["num_rejected"] = len(manifest.get("rejected") or [])
    return summary


def _manifest_dict(manifest: Any) -> dict[str, Any]:
    """A data manifest as a plain dict: a ``pipelines.data.shards.manifest.Manifest`` (``to_dict``), a mapping,
    or a path to a ``manifest.json`` file / a shard folder holding one."""
    if hasattr(manifest, "to_dict"):
        return dict(manifest.to_dict())
    if isinstance(manifest, Mapping):
        return dict(manifest)
    if isinstance(manifest, (str, Path)):
        path = Path(manifest)
        path = path / MANIFEST_NAME if path.is_dir() else path
        return json.loads(path.read_text())
    raise TypeError(f"manifest must be a Manifest, a mapping or a path, got {type(manifest).__name__}")


def _pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (given explicitly: MLflow's inference runs a subprocess)."""
    return [f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "safetensors", "numpy", "mlflow")]


def log_checkpoint_model(
    checkpoint_dir: str | Path,
    *,
    registered_model_name: str | None = None,
    manifest: Any = None,
) -> ModelRef:
    """Log a core checkpoint folder as the MLflow model ``"model"`` of the active run; register it
    under ``registered_model_name`` when given.

    Args:
        checkpoint_dir: folder with ``model.safetensors`` + ``config.json``
            (``diffusion_core.checkpoint.save_checkpoint``); other files in it are not logged.
        registered_model_name: registry name; ``None`` logs without registering.
        manifest: the training data's manifest (``Manifest``, dict, or path), stored beside the
            weights as ``manifest.json``; its ``source_checksum`` also tags the model version.

    Returns:
        A ``ModelRef``; ``model_uri`` is ``models:/<name>/<version>`` when registered.

    Raises:
        RuntimeError: if no MLflow run is active.
        FileNotFoundError: if the checkpoint files are missing.
        ValueError: if ``config.json`` is not a valid core checkpoint config.
    """
    quiet_artifact_transfers()
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_checkpoint_model must be called inside an active MLflow run (mlflow.start_run)")
    source = Path(checkpoint_dir)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (source / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {source.resolve()} has no {name}")
    read_checkpoint_config(source)  # fails early on a corrupt or incompatible config.json
    manifest_data = None if manifest is None else _manifest_dict(manifest)
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as tmp:
        staged = Path(tmp) / "checkpoint"
        staged.mkdir()
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            shutil.copy2(source / name, staged / name)
        if manifest_data is not None:
            (staged / MANIFEST_NAME).write_text(json.dumps(manifest_data, indent=2, sort_keys=True))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(PYFUNC_ENTRY),  # models-from-code: nothing is pickled
            artifacts={"checkpoint": str(staged)},
            pip_requirements=_pip_requirements(),
        )
    run_uri = f"runs:/{run.info.run_id}/{MODEL_NAME}"
    if registered_model_name is None:
        return ModelRef(model_uri=run_uri, run_id=run.info.run_id)
    tags = {"source_run_id": run.info.run_id}
    if manifest_data is not None and manifest_data.get("source_checksum"):
        tags["data_manifest_checksum"] = str(manifest_data["source_checksum"])
    version = mlflow.register_model(info.model_uri, registered_model_name, tags=tags)
    return ModelRef(
        model_uri=f"models:/{registered_model_name}/{version.version}",
        run_id=run.info.run_id,
        name=registered_model_name,
        version=str(version.version),
    )


def find_checkpoint_dir(root: Path) -> Path:
    """The shallowest folder under ``root`` (``root`` included) holding both ``model.safetensors``
    and ``config.json``.

    Raises:
        FileNotFoundError: if there is none.
    """
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    found = [p for p in candidates if (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()]
    if not found:
        raise FileNotFoundError(f"no folder with {WEIGHTS_NAME} and {CONFIG_NAME} under {root.resolve()}")
    return min(found, key=lambda p: len(p.parts))


def fetch_checkpoint(uri: str, dst: str | None = None) -> Path:
    """A local folder with ``model.safetensors`` + ``config.json`` (+ ``manifest.json`` when it
    was logged) for a model reference.

    Args:
        uri: ``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<run_id>/model``,
            ``s3://bucket/prefix`` (endpoint from ``MLFLOW_S3_ENDPOINT_URL``), or a local folder.
            MLflow URIs use the project tracking URI (``MLFLOW_TRACKING_URI`` or the SQLite
            default).
        dst: where to download to (created if missing); a fresh temporary folder by default. A
            local folder is returned in place when ``dst`` is ``None``, else copied into ``dst``.

    Returns:
        The absolute path of the checkpoint folder (inside ``dst`` for downloads).

    Raises:
        ValueError: if ``uri`` is empty or of no supported form.
        FileNotFoundError: if the folder or model does not exist, or holds no checkpoint.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"model uri must be a non-empty string, got {uri!r}")
    if uri.startswith(_REMOTE_PREFIXES):
        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="ddpm-fetch-"))
        target.mkdir(parents=True, exist_ok=True)
        tracking_uri = resolve_tracking_uri()
        quiet_artifact_transfers()
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(f"could not fetch model {uri!r} from {tracking_uri}: {err.message}") from err
        return find_checkpoint_dir(Path(local)).resolve()
    if "://" in uri or uri.startswith(("models:", "runs:")):
        raise ValueError(
            f"unsupported model uri {uri!r}; use models:/<name>/<version>, models:/<name>@<alias>, "
            "runs:/<run_id>/model, s3://bucket/prefix or a local folder"
        )
    folder = Path(uri).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder.resolve()} does not exist")
    found = find_checkpoint_dir(folder)
    if dst is None:
        return found.resolve()
    target = Path(dst) / "checkpoint"
    shutil.copytree(found, target, dirs_exist_ok=True)
    return target.resolve()
