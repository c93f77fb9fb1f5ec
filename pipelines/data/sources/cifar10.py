"""CIFAR-10 binary batches (the "binary version", never the pickled Python one): listed on the
driver (sizes checked against the record) and read in Ray tasks as ranges of records.

``data_batch_<n>.bin`` -> "train", ``test_batch.bin`` -> "test"; each file is records of 1 label
byte + 3,072 pixel bytes (1024 R, 1024 G, 1024 B, each 32x32 row-major). Class names come from
``batches.meta.txt`` when it is there. An item's identity is ``"<batch file name>:<index>"``.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from pipelines.data import storage
from pipelines.data.sources.blocks import ReadOptions, to_table
from pipelines.data.sources.byte_ranges import read_range
from pipelines.data.sources.listing import IdxPart, SourceError, SourceListing, record_split_sources, reject
from pipelines.data.transforms import output_batch, rgb_array_to_pixels

#: CIFAR-10 binary batch files, and their record: 1 label byte + 3 x 32 x 32 pixel bytes.
CIFAR_BATCH_PATTERN = re.compile(r"^(?:data_batch_\d+|test_batch)\.bin$")
CIFAR_META_NAME = "batches.meta.txt"
CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32


def _cifar_classes(root: storage.Location, names: set[str]) -> tuple[str, ...]:
    """Class names from ``batches.meta.txt`` (one a line), or () when it is absent or unreadable."""
    if CIFAR_META_NAME not in names:
        return ()
    try:
        text = storage.read_bytes(root.join(CIFAR_META_NAME)).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def list_cifar(
    root: storage.Location,
    entries: list[storage.FileEntry],
    batch_files: list[str],
    limit: int | None,
    fail_on_error: bool,
) -> SourceListing:
    """List CIFAR-10 binary batches: each file's size must be a positive multiple of the record.

    Args:
        root: the source folder.
        entries: the files of ``root`` (relative paths and sizes).
        batch_files: the ``data_batch_<n>.bin`` / ``test_batch.bin`` files among them to use.
        limit: use at most this many records of each split (first files first), or None.
        fail_on_error: raise on the first unusable file instead of recording it as rejected.

    Raises:
        SourceError: no usable batch at all.
        BadImageError: with ``fail_on_error``, naming the first unusable file.
    """
    sizes = {e.relpath: e.size for e in entries}
    rejected: list[dict[str, str]] = []
    parts: list[IdxPart] = []
    remaining = dict.fromkeys(("train", "test"), limit)
    for name in sorted(batch_files):
        size = sizes[name]
        if size == 0 or size % CIFAR_RECORD_BYTES:
            reason = (
                "empty file (0 bytes)" if size == 0 else
                f"not a CIFAR-10 binary batch: {size} bytes is not a multiple of the {CIFAR_RECORD_BYTES:,}-byte "
                f"record (1 label byte + 3,072 pixel bytes); truncated or another format "
                f"({size // CIFAR_RECORD_BYTES} whole records + {size % CIFAR_RECORD_BYTES} bytes)"
            )
            reject(rejected, name, reason, fail_on_error)
            continue
        split = "test" if name.startswith("test_batch") else "train"
        count = size // CIFAR_RECORD_BYTES
        take = count if remaining[split] is None else min(count, remaining[split])
        if take > 0:
            parts.append(IdxPart(name, None, count, CIFAR_SHAPE[1], CIFAR_SHAPE[2], take, split))
        if remaining[split] is not None:
            remaining[split] -= take
    if not parts:
        examples = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected[:3])
        raise SourceError(f"source {root.uri} holds no usable CIFAR-10 batches ({len(rejected)} rejected: {examples})")
    used = {p.images for p in parts} | {r["file"] for r in rejected} | {CIFAR_META_NAME}
    return SourceListing(
        root=root,
        kind="cifar10",
        files=tuple(e for e in entries if e.relpath in used),
        idx_parts=tuple(parts),
        classes=_cifar_classes(root, set(sizes)),
        has_labels=True,
        rejected=tuple(rejected),
        limit=limit,
        split_sources=record_split_sources(parts),
    )


def read_cifar_chunks(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for CIFAR-10 binary batches: read records [start, stop) and transform them.

    Record i of a file is bytes [i * 3073, (i + 1) * 3073): the label byte, then 1024 R, 1024 G and
    1024 B bytes, each a 32x32 image in row-major order, so the record reshapes to [3, 32, 32] (RGB).
    Input columns as for ``idx.read_idx_chunks`` ("labels" unused). Output: the ``blocks.DATASET_COLUMNS``.
    """
    outputs = []
    for row in batch.to_pylist():
        start, stop = row["start"], row["stop"]
        n = stop - start
        raw = read_range(options.root.join(row["images"]), start * CIFAR_RECORD_BYTES, n * CIFAR_RECORD_BYTES)
        records = np.frombuffer(raw, dtype=np.uint8).reshape(n, CIFAR_RECORD_BYTES)
        pixels = rgb_array_to_pixels(records[:, 1:].reshape(n, *CIFAR_SHAPE), options.spec)
        files = [f"{row['name']}:{i}" for i in range(start, stop)]
        outputs.append(output_batch(pixels, records[:, 0], files, [""] * n, options.split, row["split"]))
    return to_table(outputs, batch.column("block")[0].as_py())
