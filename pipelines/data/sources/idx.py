"""MNIST-family IDX sources: ``<stem>-images-idx3-ubyte[.gz]`` with optional
``<stem>-labels-idx1-ubyte[.gz]`` beside them, listed on the driver (headers and sizes checked) and
read in Ray tasks as ranges of images.

A stem ending in ``t10k`` or ``test`` is split "test", any other stem "train". An item's identity
is ``"<images file name without .gz>:<index>"`` (so a decompressed copy splits the same way).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from pipelines.data import storage
from pipelines.data.sources.blocks import ReadOptions, to_table
from pipelines.data.sources.byte_ranges import open_stream, read_range
from pipelines.data.sources.listing import IdxPart, SourceError, SourceListing, record_split_sources, reject
from pipelines.data.transforms import gray_array_to_pixels, output_batch

IDX_IMAGES_PATTERN = re.compile(r"^(?P<stem>.+)-images-idx3-ubyte(?P<gz>\.gz)?$")
#: IDX stems of the source's test split (Fashion-MNIST/MNIST ``t10k``, EMNIST ``...-test``).
IDX_TEST_STEM = re.compile(r"(?:^|[-_.])(?:t10k|test)$", re.IGNORECASE)
IDX_UBYTE = 0x08


def _read_idx_header(loc: storage.Location, ndim: int) -> tuple[tuple[int, ...], int]:
    """Read an IDX header (big-endian, see the IDX format spec) and count the data bytes after it.

    Returns:
        (dims, data_bytes): the dimension sizes and the number of bytes following the header.

    Raises:
        ValueError: with the reason when the file is empty, not IDX, not unsigned bytes, of the
            wrong rank, or has corrupt compression.
    """
    try:
        with open_stream(loc) as stream:
            magic = stream.read(4)
            if len(magic) == 0:
                raise ValueError("empty file (0 bytes)")
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                raise ValueError("not an IDX file (bad magic number)")
            if magic[2] != IDX_UBYTE or magic[3] != ndim:
                raise ValueError(
                    f"expected IDX unsigned-byte data with {ndim} dimension(s), "
                    f"got type code 0x{magic[2]:02x} with {magic[3]} dimension(s)"
                )
            raw_dims = stream.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise ValueError("truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            data_bytes = 0
            while chunk := stream.read(1 << 23):
                data_bytes += len(chunk)
    except OSError as error:
        raise ValueError(f"unreadable or corrupt compressed data ({error})") from None
    return dims, data_bytes


def _check_idx_pair(root: storage.Location, images: str, labels: str | None) -> tuple[int, int, int]:
    """Validate an IDX images file (and labels file); return (count, rows, cols)."""
    dims, data_bytes = _read_idx_header(root.join(images), ndim=3)
    count, rows, cols = dims
    if data_bytes != count * rows * cols:
        raise ValueError(
            f"truncated or oversized IDX data: header says {count}x{rows}x{cols} = "
            f"{count * rows * cols} bytes, file has {data_bytes}"
        )
    if labels is not None:
        try:
            (label_count,), label_bytes = _read_idx_header(root.join(labels), ndim=1)
        except ValueError as error:
            raise ValueError(f"labels file {labels}: {error}") from None
        if label_count != count or label_bytes != count:
            raise ValueError(
                f"labels file {labels} holds {label_bytes} labels (header {label_count}), images file has {count}"
            )
    return count, rows, cols


def list_idx(
    root: storage.Location,
    entries: list[storage.FileEntry],
    images_files: list[str],
    limit: int | None,
    fail_on_error: bool,
) -> SourceListing:
    """List IDX images files (each with its labels file when there is one), checking every header and size.

    Args:
        root: the source folder.
        entries: the files of ``root`` (relative paths and sizes).
        images_files: the ``*-images-idx3-ubyte[.gz]`` files among them to use.
        limit: use at most this many images of each split (first files first), or None.
        fail_on_error: raise on the first unusable file instead of recording it as rejected.

    Raises:
        SourceError: no usable IDX image at all.
        BadImageError: with ``fail_on_error``, naming the first unusable file.
    """
    names = {e.relpath for e in entries}
    used: set[str] = set()
    rejected: list[dict[str, str]] = []
    parts: list[IdxPart] = []
    remaining = dict.fromkeys(("train", "test"), limit)
    for images in sorted(images_files):
        stem = IDX_IMAGES_PATTERN.match(images).group("stem")
        split = "test" if IDX_TEST_STEM.search(stem) else "train"
        candidates = (f"{stem}-labels-idx1-ubyte.gz", f"{stem}-labels-idx1-ubyte")
        labels = next((c for c in candidates if c in names), None)
        used.update({images, labels} - {None})
        try:
            count, rows, cols = _check_idx_pair(root, images, labels)
        except ValueError as error:
            reject(rejected, images, str(error), fail_on_error)
            continue
        take = count if remaining[split] is None else min(count, remaining[split])
        if take > 0:
            parts.append(IdxPart(images, labels, count, rows, cols, take, split))
        if remaining[split] is not None:
            remaining[split] -= take
    if not parts or sum(p.take for p in parts) == 0:
        raise SourceError(f"source {root.uri} holds no usable IDX images ({len(rejected)} file(s) rejected)")
    return SourceListing(
        root=root,
        kind="idx",
        files=tuple(e for e in entries if e.relpath in used),
        idx_parts=tuple(parts),
        has_labels=all(p.labels is not None for p in parts),
        rejected=tuple(rejected),
        limit=limit,
        split_sources=record_split_sources(parts),
    )


def read_idx_chunks(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for IDX sources: read image ranges [start, stop) and transform them.

    Input columns: "images", "labels" (relative paths, "" for none), "name" (identity prefix),
    "rows", "cols" (image size in the file), "start", "stop", "split" (the file's split).
    Output: the ``blocks.DATASET_COLUMNS`` (see ``dataset.build_dataset``).
    """
    outputs = []
    for row in batch.to_pylist():
        start, stop, rows, cols = row["start"], row["stop"], row["rows"], row["cols"]
        n = stop - start
        raw = read_range(options.root.join(row["images"]), 16 + start * rows * cols, n * rows * cols)
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(n, rows, cols)
        if row["labels"]:
            labels = np.frombuffer(read_range(options.root.join(row["labels"]), 8 + start, n), dtype=np.uint8)
        else:
            labels = np.full(n, -1)
        files = [f"{row['name']}:{i}" for i in range(start, stop)]
        pixels = gray_array_to_pixels(pixels, options.spec)
        outputs.append(output_batch(pixels, labels, files, [""] * n, options.split, row["split"]))
    return to_table(outputs, batch.column("block")[0].as_py())
