"""Read side of the shards format: the manifest, and one split as numpy arrays (pyarrow only) or as a
lazy Ray Dataset, each validated against the manifest first (schema version, image shape and
dtype, row counts; ``ShardError`` otherwise).

Readers refuse a root without ``manifest.json`` and read exactly the shard files it lists
(``pipelines/data/shards/__init__.py``, "The manifest is the commit marker").
"""

from __future__ import annotations

import contextlib
import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.extensions import ArrowTensorArray

from pipelines.data import storage
from pipelines.data.shards.manifest import (
    MANIFEST_NAME,
    META_IMAGE_SHAPE,
    META_SCHEMA_VERSION,
    READABLE_SCHEMA_VERSIONS,
    SPLITS,
    Manifest,
    ShardError,
    ShardFile,
    Split,
)


def load_manifest(root: str) -> Manifest:
    """Read and validate ``root/manifest.json`` (``root`` local or ``s3://``).

    Raises:
        ShardError: no manifest (an incomplete or absent output), unreadable JSON, an
            incompatible schema version or malformed fields.
    """
    loc = storage.resolve(root)
    try:
        raw = storage.read_bytes(loc.join(MANIFEST_NAME))
    except (FileNotFoundError, OSError) as error:
        raise ShardError(
            f"no {MANIFEST_NAME} at {loc.uri}: not a completed preprocessing output "
            f"(the manifest is written last and marks the output complete) ({error})"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ShardError(f"{loc.join(MANIFEST_NAME).uri} is not valid JSON: {error}") from None
    return Manifest.from_dict(data)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_shard_schema(schema: pa.Schema, manifest: Manifest, where: str) -> None:
    """Validate one shard's Parquet schema against the manifest (version, shape, dtype, columns)."""
    metadata = schema.metadata or {}
    version = metadata.get(META_SCHEMA_VERSION, b"").decode() or None
    if version not in {str(v) for v in READABLE_SCHEMA_VERSIONS}:
        raise ShardError(
            f"shard {where} has schema version {version!r}; expected one of {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    shape = json.loads(metadata.get(META_IMAGE_SHAPE, b"null"))
    if shape is None or tuple(shape) != manifest.image_shape:
        raise ShardError(f"shard {where} holds images of shape {shape}, manifest says {list(manifest.image_shape)}")
    names = set(schema.names)
    if not {"image", "label"} <= names:
        raise ShardError(f"shard {where} lacks columns 'image'/'label' (has {sorted(names)})")
    image_type = schema.field("image").type
    storage_type = getattr(image_type, "storage_type", image_type)
    value_type = getattr(storage_type, "value_type", None)
    if value_type != pa.float32():
        raise ShardError(f"shard {where}: column 'image' must hold float32 values, got {image_type}")
    if schema.field("label").type != pa.int64():
        raise ShardError(f"shard {where}: column 'label' must be int64, got {schema.field('label').type}")


def _validated_shards(root: str, split: str) -> tuple[Manifest, storage.Location, list[ShardFile]]:
    """Manifest, root location and the split's shard files, each checked against the manifest."""
    _check_split(split)
    manifest = load_manifest(root)
    loc = storage.resolve(root)
    files = list(manifest.shards.get(split, ()))
    listed_rows = sum(s.rows for s in files)
    if listed_rows != manifest.counts[split]:
        raise ShardError(f"manifest at {loc.uri} lists {listed_rows} {split} rows in shards but counts {manifest.counts[split]}")
    for shard in files:
        shard_loc = loc.join(shard.path)
        try:
            metadata = pq.read_metadata(shard_loc.path, filesystem=shard_loc.fs)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as error:
            raise ShardError(f"shard {shard_loc.uri} listed in the manifest is missing or unreadable: {error}") from None
        _check_shard_schema(metadata.schema.to_arrow_schema(), manifest, shard_loc.uri)
        if metadata.num_rows != shard.rows:
            raise ShardError(f"shard {shard_loc.uri} has {metadata.num_rows} rows, the manifest says {shard.rows}")
    return manifest, loc, files


def _images_to_numpy(column: pa.ChunkedArray, shape: tuple[int, int, int]) -> np.ndarray:
    """Flatten a tensor column (Ray extension type or its list storage) to float32 [N, C, H, W]."""
    chunks = []
    for chunk in column.chunks:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        chunks.append(np.asarray(values, dtype=np.float32).reshape(len(chunk), *shape))
    if not chunks:
        return np.zeros((0, *shape), dtype=np.float32)
    return np.concatenate(chunks)


def read_split_numpy(root: str, split: Split, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a split into memory with pyarrow (no Ray), validated against the manifest.

    Args:
        root: output root (local path or ``s3://bucket/prefix``).
        split: "train", "val" or "test".
        limit: return only the first ``limit`` rows (in manifest shard order), or all when None.

    Returns:
        (images, labels): float32 [N, C, H, W] with values k/127.5 - 1 in [-1, 1], and int64 [N]
        (-1 where unknown).

    Raises:
        ValueError: for an unknown split or a negative limit.
        ShardError: missing manifest, incompatible schema version, shape/dtype/count mismatch.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    manifest, loc, files = _validated_shards(root, split)
    wanted = manifest.counts[split] if limit is None else min(limit, manifest.counts[split])
    images, labels, have = [], [], 0
    for shard in files:
        if have >= wanted:
            break
        shard_loc = loc.join(shard.path)
        table = pq.read_table(shard_loc.path, filesystem=shard_loc.fs, columns=["image", "label"])
        table = table.slice(0, wanted - have)
        images.append(_images_to_numpy(table.column("image"), manifest.image_shape))
        labels.append(table.column("label").to_numpy().astype(np.int64, copy=False))
        have += table.num_rows
    if not images:
        return np.zeros((0, *manifest.image_shape), np.float32), np.zeros((0,), np.int64)
    out_images, out_labels = np.concatenate(images), np.concatenate(labels)
    if out_images.shape[0] != wanted:
        raise ShardError(f"read {out_images.shape[0]} {split} rows from {loc.uri}, expected {wanted}")
    return out_images, out_labels


def read_split(root: str, split: Split):
    """A lazy ``ray.data.Dataset`` of one split, validated against the manifest first.

    Columns: "image" (fixed-shape float32 tensor [C, H, W], values k/127.5 - 1 in [-1, 1]) and
    "label" (int64, -1 where unknown); ``count()`` equals ``manifest.counts[split]``.

    Raises:
        ValueError: for an unknown split.
        ShardError: missing manifest, incompatible schema version, shape/dtype/count mismatch.
    """
    manifest, loc, files = _validated_shards(root, split)
    if not files:
        empty = pa.table(
            {
                "image": ArrowTensorArray.from_numpy(np.zeros((0, *manifest.image_shape), np.float32)),
                "label": pa.array([], pa.int64()),
            }
        )
        return ray.data.from_arrow(empty)
    paths = [loc.join(s.path).path for s in files]
    with _file_list_parquet_reader():
        return ray.data.read_parquet(paths, filesystem=loc.fs).select_columns(["image", "label"])


@contextlib.contextmanager
def _file_list_parquet_reader() -> Iterator[None]:
    """Ray Data's first Parquet reader (``DataContext.use_datasource_v2 = False``) for the
    ``read_parquet`` calls inside, the context's previous choice restored afterwards.

    Why: Ray Data 2.60's default (V2) reader lists files through a pool of
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` = 32 ``FooterReader`` actors per read, whatever the
    number of files; each is a Python worker process. Measured on a 2-core node reading the 7
    train shards of Fashion-MNIST: 32 such actors with V2, none with V1 (the same 53,938 rows),
    and with V2 every training job made the raylet warn that "8 (then 12) PYTHON worker processes
    have been started". This project passes the exact file list of the manifest, so it needs
    none of V2's listing and row-group pruning. The choice is made when ``read_parquet`` is
    called, so restoring the context afterwards does not change the dataset built inside.
    """
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous

