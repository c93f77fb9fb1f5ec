"""The contract between the driver and the read tasks, shared by every format: the options shipped
to each task (:class:`ReadOptions`), how many items a block holds, the input table of a block of
record files, and the output columns (``DATASET_COLUMNS``) every task returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from ray.data.extensions import ArrowTensorArray

from pipelines.data import storage
from pipelines.data.sources.listing import SourceListing
from pipelines.data.transforms import ImageSpec, SplitSpec

#: Output columns of every read task, hence of the dataset of ``dataset.build_dataset``.
DATASET_COLUMNS = ("image", "label", "split", "error", "file", "block")


@dataclass(frozen=True)
class ReadOptions:
    """How items are read and transformed inside the Ray tasks (shipped to every task).

    Attributes:
        root: the source root (filesystem + path), built on the driver.
        spec: output image size/mode and the pixel limit.
        split: how "val" is carved from "train" (``val_fraction=0`` when the source has its own val).
        fail_on_error: raise ``BadImageError`` on the first bad item instead of marking it.
    """

    root: storage.Location
    spec: ImageSpec
    split: SplitSpec
    fail_on_error: bool


def rows_per_block(num_items: int, image_bytes: int, num_cpus: int, target_block_bytes: int) -> int:
    """Items per read/transform task: bounded output size, and at least ~4 tasks per CPU.

    Args:
        num_items: items in the source (>= 1).
        image_bytes: output bytes per item (C*H*W*4).
        num_cpus: CPUs of the cluster (>= 1).
        target_block_bytes: upper bound on a block's image bytes.
    """
    by_size = max(1, target_block_bytes // max(1, image_bytes))
    by_parallelism = max(1, math.ceil(num_items / (4 * max(1, num_cpus))))
    return int(min(by_size, by_parallelism))


def record_blocks(listing: SourceListing, per_block: int) -> list[pa.Table]:
    """The input tables of the read tasks of a record source (IDX, CIFAR-10): one row per block of
    at most ``per_block`` records of one file, with the file names ("images", "labels", "" for none),
    the identity prefix "name", the image size "rows" x "cols", the range [start, stop), the
    source's "split" and the "block" index, in listing order."""
    return [
        pa.Table.from_pylist(
            [
                {
                    "images": part.images,
                    "labels": part.labels or "",
                    "name": part.name,
                    "rows": part.rows,
                    "cols": part.cols,
                    "start": start,
                    "stop": min(start + per_block, part.take),
                    "split": part.split,
                    "block": block,
                }
            ]
        )
        for block, (part, start) in enumerate(
            (part, start) for part in listing.idx_parts for start in range(0, part.take, per_block)
        )
    ]


def to_table(outputs: list[dict[str, np.ndarray]], block: int) -> pa.Table:
    """Concatenate output batches into one Arrow table with a Ray tensor column "image"."""
    columns = {name: np.concatenate([o[name] for o in outputs]) for name in DATASET_COLUMNS if name != "block"}
    return pa.table(
        {
            "image": ArrowTensorArray.from_numpy(columns["image"]),
            "label": pa.array(columns["label"], pa.int64()),
            "split": pa.array(columns["split"].tolist(), pa.string()),
            "error": pa.array(columns["error"].tolist(), pa.string()),
            "file": pa.array(columns["file"].tolist(), pa.string()),
            "block": pa.array(np.full(len(columns["label"]), block), pa.int64()),
        }
    )
