"""The Ray Dataset of a listed source: the input blocks, the read task of its format, and the
dataset whose map tasks read, decode and transform the items in parallel.
"""

from __future__ import annotations

import math

import pyarrow as pa
import ray

from pipelines.data.sources.blocks import ReadOptions, record_blocks, rows_per_block
from pipelines.data.sources.cifar10 import read_cifar_chunks
from pipelines.data.sources.idx import read_idx_chunks
from pipelines.data.sources.image_folder import file_blocks, read_image_files
from pipelines.data.sources.listing import SourceListing
from pipelines.data.transforms import ImageSpec


def input_blocks(listing: SourceListing, spec: ImageSpec, *, num_cpus: int, target_block_bytes: int) -> list[pa.Table]:
    """The input of each read/transform task, one small Arrow table per block, in listing order.

    For folders: columns "file", "label", "split", "block"; for IDX and CIFAR-10: one row per block
    with the file names, image size, split and the item range [start, stop). Sized by
    :func:`rows_per_block`.
    """
    per_block = rows_per_block(listing.num_items, 4 * math.prod(spec.shape), num_cpus, target_block_bytes)
    return file_blocks(listing, per_block) if listing.kind == "images" else record_blocks(listing, per_block)


def block_reader(listing: SourceListing):
    """The task body for this kind of source: ``idx.read_idx_chunks``, ``cifar10.read_cifar_chunks``
    or ``image_folder.read_image_files``."""
    return {"idx": read_idx_chunks, "cifar10": read_cifar_chunks, "images": read_image_files}[listing.kind]


def build_dataset(listing: SourceListing, options: ReadOptions, *, num_cpus: int, target_block_bytes: int):
    """A Ray Dataset with columns ``blocks.DATASET_COLUMNS`` for every listed item (bad items marked).

    Columns: "image" float32 [C,H,W] in [-1, 1] (zeros for rejected items), "label" int64 (-1
    where unknown), "split" str (the output split), "error" str ("" when fine, else the rejection reason), "file"
    str (the item's identity), "block" int64 (index of the block in listing order; names the
    shards, so their order follows the listing and a retried task rewrites the same files).

    Args:
        listing: from ``detect.list_source``.
        options: what the tasks need (see :class:`ReadOptions`).
        num_cpus: CPUs of the cluster, used to size the blocks.
        target_block_bytes: upper bound on the image bytes of one block (memory per task).
    """
    tables = input_blocks(listing, options.spec, num_cpus=num_cpus, target_block_bytes=target_block_bytes)
    return ray.data.from_arrow(tables).map_batches(
        block_reader(listing), batch_size=None, batch_format="pyarrow", fn_kwargs={"options": options}
    )
