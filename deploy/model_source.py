"""What a served model is: its registry name/version and MLflow run, resolved from the model URI.

``describe_model_uri`` answers ``GET /model``'s "which model is this" part without downloading
anything; ``manifest_summary`` condenses the training data's ``manifest.json``. The files
themselves are fetched by ``pipelines.model_store.fetch_checkpoint``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)/")

_MANIFEST_SUMMARY_KEYS = (
    "schema_version", "image_shape", "counts", "has_labels", "normalization", "source", "source_checksum", "created_at",
)


@dataclass(frozen=True)
class ModelSource:
    """Identity of a served model.

    Attributes:
        uri: the URI it was loaded from (``models:/...``, ``runs:/...``, ``s3://...`` or a folder).
        name: registered model name (``None`` for a run or a plain checkpoint path).
        version: registered version as a string (resolved from an alias when one was given).
        alias: the alias of a ``models:/<name>@<alias>`` URI, else ``None``.
        run_id: the MLflow run that logged the model, when known.
    """

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON responses."""
        return asdict(self)


def describe_model_uri(uri: str, metadata: dict[str, Any] | None = None) -> ModelSource:
    """Resolve the registry name, version and run id of ``uri``.

    ``models:/<name>/<version>`` and ``models:/<name>@<alias>`` are looked up in the MLflow
    Model Registry (tracking/registry URI from ``pipelines.mlflow_setup.resolve_tracking_uri``);
    ``runs:/<run_id>/...`` gives the run id directly; for a checkpoint path the run id is taken
    from the checkpoint ``metadata`` key ``"run_id"`` or ``"mlflow_run_id"`` when present.

    Raises:
        mlflow.exceptions.MlflowException: if a registry URI names a missing model/version/alias.
    """
    metadata = metadata or {}
    run_from_metadata = metadata.get("run_id") or metadata.get("mlflow_run_id")
    by_version, by_alias, by_run = _MODELS_VERSION.match(uri), _MODELS_ALIAS.match(uri), _RUNS.match(uri)
    if by_version or by_alias:
        from mlflow import MlflowClient

        from pipelines.mlflow_setup import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri()
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if by_version:
            version = client.get_model_version(by_version["name"], by_version["version"])
            alias = None
        else:
            version = client.get_model_version_by_alias(by_alias["name"], by_alias["alias"])
            alias = by_alias["alias"]
        return ModelSource(uri=uri, name=version.name, version=str(version.version), alias=alias,
                           run_id=version.run_id or run_from_metadata)
    if by_run:
        return ModelSource(uri=uri, run_id=by_run["run_id"])
    return ModelSource(uri=uri, run_id=run_from_metadata)


def read_manifest_summary(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """Summary of ``manifest.json`` beside a checkpoint (``None`` when there is none).

    Keeps schema_version, image_shape, counts, has_labels, normalization, source,
    source_checksum and created_at, and replaces the list of rejected inputs by its length
    (``num_rejected``).

    Raises:
        ValueError: if ``manifest.json`` exists but is not a JSON object.
    """
    path = Path(checkpoint_dir) / "manifest.json"
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
