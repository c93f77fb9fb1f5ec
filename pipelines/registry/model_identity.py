"""Which model a URI names: its registered name, version, alias, MLflow logged-model id and the run
that trained it, resolved without downloading any file.

One parser for every model URI the project takes (docs/ARCHITECTURE.md, "Model URIs"):
``models:/<name>/<version>``, ``models:/<name>@<alias>``, ``runs:/<run_id>/<path>``, ``s3://...`` and
local checkpoint folders. ``pipelines/evaluate.py`` tags its runs with it and Serve's ``GET /model``
reports it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mlflow import MlflowClient

from pipelines.registry.tracking_uri import resolve_tracking_uri

_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[^/]+)/")

UriKind = Literal["version", "alias", "run", "other"]


@dataclass(frozen=True)
class ParsedModelUri:
    """The parts of a model URI.

    Attributes:
        kind: "version" (``models:/name/3``), "alias" (``models:/name@prod``), "run"
            (``runs:/<id>/model``) or "other" (``s3://``, a folder, ...).
        name, version, alias, run_id: the parts the URI spells out (``None`` where it does not).
    """

    kind: UriKind
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None


def parse_model_uri(uri: str) -> ParsedModelUri:
    """Split ``uri`` into its registry parts; anything that is not a registry or run URI is "other".

    Raises:
        ValueError: if ``uri`` is not a non-empty string.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"model uri must be a non-empty string, got {uri!r}")
    if match := _MODELS_VERSION.match(uri):
        return ParsedModelUri("version", name=match["name"], version=match["version"])
    if match := _MODELS_ALIAS.match(uri):
        return ParsedModelUri("alias", name=match["name"], alias=match["alias"])
    if match := _RUNS.match(uri):
        return ParsedModelUri("run", run_id=match["run_id"])
    return ParsedModelUri("other")


@dataclass(frozen=True)
class ModelIdentity:
    """Identity of a model.

    Attributes:
        uri: the URI it was loaded from (``models:/...``, ``runs:/...``, ``s3://...`` or a folder).
        name: registered model name (``None`` for a run or a plain checkpoint path).
        version: registered version as a string (resolved from an alias when one was given).
        alias: the alias of a ``models:/<name>@<alias>`` URI, else ``None``.
        run_id: the MLflow run that logged the model, when known.
        model_id: the MLflow 3 logged-model id of a registered version (``None`` otherwise).
    """

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    model_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON responses."""
        return asdict(self)


def logged_model_id(model_version: Any) -> str | None:
    """The MLflow 3 logged-model id behind a registered version: its ``model_id``, or parsed from a
    ``models:/m-<id>`` source (the SQLite registry leaves ``model_id`` empty)."""
    if getattr(model_version, "model_id", None):
        return model_version.model_id
    source = model_version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def describe_model(uri: str, metadata: dict[str, Any] | None = None, client: MlflowClient | None = None) -> ModelIdentity:
    """Resolve the registry name, version, logged-model id and run id of ``uri``.

    Registry URIs are looked up in the MLflow Model Registry (``client``, by default one on
    ``resolve_tracking_uri()``); ``runs:/<run_id>/...`` gives the run id directly; for any other URI
    the run id comes from the checkpoint ``metadata`` key ``"run_id"`` or ``"mlflow_run_id"``.

    Raises:
        ValueError: if ``uri`` is empty.
        mlflow.exceptions.MlflowException: if a registry URI names a missing model, version or alias.
    """
    metadata = metadata or {}
    run_from_metadata = metadata.get("run_id") or metadata.get("mlflow_run_id")
    parsed = parse_model_uri(uri)
    if parsed.kind in ("version", "alias"):
        if client is None:
            tracking_uri = resolve_tracking_uri()
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if parsed.kind == "version":
            version = client.get_model_version(parsed.name, parsed.version)
        else:
            version = client.get_model_version_by_alias(parsed.name, parsed.alias)
        return ModelIdentity(uri=uri, name=version.name, version=str(version.version), alias=parsed.alias,
                             run_id=version.run_id or run_from_metadata, model_id=logged_model_id(version))
    if parsed.kind == "run":
        return ModelIdentity(uri=uri, run_id=parsed.run_id)
    return ModelIdentity(uri=uri, run_id=run_from_metadata)
