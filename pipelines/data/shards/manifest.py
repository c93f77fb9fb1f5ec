"""The shards format's constants and its manifest (``DST/manifest.json``): what a shard file holds,
which versions are read, and :class:`Manifest` with its JSON form.

The layout, the splits and the commit protocol are described in ``pipelines/data/shards/__init__.py``.
Pure Python: no storage, Ray or pyarrow import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Version of this on-disk format written by this code. 2: the source's own splits ("test", the
#: manifest's ``splits``); the shard files themselves are unchanged since 1.
SCHEMA_VERSION = 2
#: Versions readers accept (manifests and shards); anything else is refused.
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
#: Parquet schema metadata keys stamped on every shard.
META_SCHEMA_VERSION = b"ray_ddpm.schema_version"
META_IMAGE_SHAPE = b"ray_ddpm.image_shape"
NORMALIZATION = {
    "formula": "x = k / 127.5 - 1 for uint8 pixel value k",
    "dtype": "float32",
    "min": -1.0,
    "max": 1.0,
    "levels": 256,
}
Split = Literal["train", "val", "test"]


class ShardError(ValueError):
    """Preprocessed shards are missing, incomplete, or do not match their manifest."""


def shard_schema_metadata(image_shape: tuple[int, int, int]) -> dict[bytes, bytes]:
    """The Parquet schema metadata stamped on every shard: the format version and the image shape (C, H, W)."""
    return {META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(), META_IMAGE_SHAPE: json.dumps(list(image_shape)).encode()}


@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard: ``path`` relative to the root (e.g. "train/part-<hex>.parquet") and its row count."""

    path: str
    rows: int


@dataclass(frozen=True)
class Manifest:
    """Everything known about one preprocessing output (``DST/manifest.json``).

    Attributes:
        schema_version: format version, ``SCHEMA_VERSION`` when written by this code (1 is read too).
        image_shape: (C, H, W) of every image.
        counts: rows per split, {"train": n, "val": n, "test": n}.
        has_labels: True when every row has a label >= 0.
        normalization: how pixel values were scaled (see ``NORMALIZATION``).
        source: the absolute source location (path or s3:// URI).
        command: the command line (or call) that produced the output.
        source_checksum: sha256 of the source listing (relative path + size of each file).
        rejected: each input file not converted, as {"file": ..., "reason": ...}.
        created_at: ISO-8601 UTC time the output was committed.
        classes: class names, label i = classes[i]; empty when unlabelled or labels come from IDX.
        shards: per split, the shard files holding its rows.
        options: the job settings (size, mode, resample, val_fraction, seed, limit, ...).
        splits: where each split came from (``pipelines/data/shards/__init__.py``, "Splits").
    """

    schema_version: int
    image_shape: tuple[int, int, int]
    counts: dict[str, int]
    has_labels: bool
    normalization: dict[str, Any]
    source: str
    command: str
    source_checksum: str
    rejected: tuple[dict[str, str], ...]
    created_at: str
    classes: tuple[str, ...] = ()
    shards: dict[str, tuple[ShardFile, ...]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists instead of tuples)."""
        data = asdict(self)
        data["image_shape"] = list(self.image_shape)
        data["rejected"] = [dict(r) for r in self.rejected]
        data["classes"] = list(self.classes)
        data["shards"] = {split: [asdict(s) for s in files] for split, files in self.shards.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a dict written by :meth:`to_dict`.

        Raises:
            ShardError: on a different ``schema_version`` or missing/malformed fields.
        """
        if not isinstance(data, dict):
            raise ShardError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
            raise ShardError(
                f"incompatible shard schema version {version!r}: this code reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; re-run pipelines/preprocess.py to regenerate the shards"
            )
        try:
            shape = tuple(int(d) for d in data["image_shape"])
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"image_shape must be 3 positive integers, got {data['image_shape']!r}")
            counts = {split: int(data["counts"][split]) for split in SPLITS if version >= 2 or split != "test"}
            counts.setdefault("test", 0)
            shards = {
                split: tuple(ShardFile(str(s["path"]), int(s["rows"])) for s in data.get("shards", {}).get(split, []))
                for split in SPLITS
            }
            return cls(
                schema_version=int(version),
                image_shape=shape,  # type: ignore[arg-type]
                counts=counts,
                has_labels=bool(data["has_labels"]),
                normalization=dict(data["normalization"]),
                source=str(data["source"]),
                command=str(data["command"]),
                source_checksum=str(data["source_checksum"]),
                rejected=tuple({"file": str(r["file"]), "reason": str(r["reason"])} for r in data["rejected"]),
                created_at=str(data["created_at"]),
                classes=tuple(str(c) for c in data.get("classes", [])),
                shards=shards,
                options=dict(data.get("options", {})),
                splits=_splits_of(data, int(version)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ShardError(f"malformed manifest: {type(error).__name__}: {error}") from None


def _splits_of(data: dict[str, Any], version: int) -> dict[str, dict[str, Any]]:
    """The ``splits`` entry, checked (version 2), or reconstructed for a version 1 manifest."""
    if version == 1:
        options = data.get("options", {})
        return {
            "train": {"rule": "source", "sources": [str(data["source"])]},
            "val": {"rule": "hash", "from": "train", "fraction": float(options.get("val_fraction", 0.0)),
                    "seed": int(options.get("seed", 0))},
        }
    splits = {str(name): dict(entry) for name, entry in data["splits"].items()}
    for name, entry in splits.items():
        if name not in SPLITS:
            raise ValueError(f"splits has an unknown split {name!r} (known: {', '.join(SPLITS)})")
        if entry.get("rule") == "source":
            entry["sources"] = [str(s) for s in entry["sources"]]
        elif entry.get("rule") == "hash":
            if entry.get("from") not in SPLITS:
                raise ValueError(f"splits.{name}.from must be one of {SPLITS}, got {entry.get('from')!r}")
        else:
            raise ValueError(f"splits.{name}.rule must be 'source' or 'hash', got {entry.get('rule')!r}")
    return splits
