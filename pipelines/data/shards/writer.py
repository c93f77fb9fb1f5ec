"""Task side of the shards format: one Ray task writes its block's good rows as Parquet shards into
the job's staging folder and reports what it wrote and what it rejected.

Every shard is zstd-compressed and stamped with ``manifest.shard_schema_metadata``; writes happen
only while the job's ``StagingGate`` admits them (``pipelines/data/shards/__init__.py``, "A failed
job leaves nothing").
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.data import staging_gate, storage
from pipelines.data.shards.manifest import SPLITS, shard_schema_metadata

#: zstd + pyarrow's default dictionary encoding: a shard holds at most 256 distinct pixel values,
#: which dictionary encoding stores as one byte each before zstd compresses them.
SHARD_COMPRESSION = "zstd"
#: Columns of the per-task report returned by :func:`write_shards`.
REPORT_SCHEMA = pa.schema(
    [("split", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("file", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class ShardTarget:
    """Where a job's tasks write shards: the temporary root, the expected image shape (C, H, W),
    and the job's ``StagingGate`` actor handle (``None``: write without one, e.g. outside Ray)."""

    root: storage.Location
    image_shape: tuple[int, int, int]
    gate: Any = None


def _shard_name(rows: pa.Table) -> str:
    """``part-<block:06d>-<hash of the first item's identity>.parquet``: deterministic, so a rerun
    or a retried task gives the same names, and sorting by name follows the listing order."""
    first_file = rows.column("file")[0].as_py()
    digest = hashlib.blake2b(first_file.encode(), digest_size=4).hexdigest()
    return f"part-{rows.column('block')[0].as_py():06d}-{digest}.parquet"


def write_shards(block: pa.Table, target: ShardTarget) -> pa.Table:
    """Ray task body: write one block's good rows as one shard per split present; report the rest.

    Args:
        block: columns "image" (Ray tensor [C, H, W] float32), "label" int64, "split" str (one of
            ``SPLITS``), "error" str ("" for good rows), "file" str, "block" int64 (see ``_shard_name``).
        target: where to write.

    Returns:
        a small table (``REPORT_SCHEMA``): one row per shard written (split, path, rows) and one
        per rejected item (file, reason).

    The shards are written inside ``staging_gate.admitted(target.gate)``: nothing is written once
    the job's gate is closed, and a cancellation arriving mid-write takes effect after the write.
    """
    good_mask = pc.equal(block.column("error"), "")
    good = block.filter(good_mask)
    bad = block.filter(pc.invert(good_mask))
    report: list[dict[str, Any]] = []
    with staging_gate.admitted(target.gate) as may_write:
        for split in SPLITS if may_write else ():
            rows = good.filter(pc.equal(good.column("split"), split))
            if rows.num_rows == 0:
                continue
            relpath = f"{split}/{_shard_name(rows)}"
            _write_shard(rows.select(["image", "label"]), target, relpath)
            report.append({"split": split, "path": relpath, "rows": rows.num_rows, "file": "", "reason": ""})
    for file, reason in zip(bad.column("file").to_pylist(), bad.column("error").to_pylist()):
        report.append({"split": "", "path": "", "rows": 0, "file": file, "reason": reason})
    return pa.Table.from_pylist(report, schema=REPORT_SCHEMA)


def _write_shard(part: pa.Table, target: ShardTarget, relpath: str) -> None:
    """Write one shard (columns "image", "label") to ``target.root/relpath``, zstd-compressed and
    stamped with ``shard_schema_metadata``."""
    destination = target.root.join(relpath)
    if not destination.is_s3:
        destination.fs.create_dir(posixpath.dirname(destination.path), recursive=True)
    part = part.replace_schema_metadata(shard_schema_metadata(target.image_shape))
    pq.write_table(part, destination.path, filesystem=destination.fs, compression=SHARD_COMPRESSION)
