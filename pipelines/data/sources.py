"""Image sources of the preprocessing job: list them on the driver, read them with Ray Data.

Three kinds of source, each a local path or an ``s3://bucket/prefix``, each keeping the splits
it defines (``pipelines/data/shards.py``, "Splits"):

* ``idx``: MNIST-family IDX files, ``<stem>-images-idx3-ubyte[.gz]`` with optional
  ``<stem>-labels-idx1-ubyte[.gz]`` beside them. A folder holding several (train and t10k) is
  read whole; a single images file can also be named. A stem ending in ``t10k`` or ``test`` is
  split "test", any other stem "train". An item's identity is
  ``"<images file name without .gz>:<index>"`` (so a decompressed copy splits the same way).
* ``cifar10``: CIFAR-10's binary batches (the "binary version", never the pickled Python one):
  ``data_batch_<n>.bin`` -> "train", ``test_batch.bin`` -> "test"; each file is records of 1 label
  byte + 3,072 pixel bytes (1024 R, 1024 G, 1024 B, each 32x32 row-major). Class names come from
  ``batches.meta.txt`` when it is there. A folder or one batch file; identity as for IDX.
* ``images``: a folder tree of PNG/JPEG/BMP/TIFF/WebP files. When its top-level folders are
  ``train/`` and/or ``test/`` (and optionally ``val/``), and nothing else, those are the splits and
  the level below them the classes; otherwise everything is "train". Files directly inside the
  (split) folder have no label (-1); each sub-folder of it is a class, sorted names (over all
  splits) -> 0..K-1, and everything below it carries that label. An item's identity is its
  relative path.

``--limit N`` keeps the first N items of each split the source defines (in listing order).

Listing (:func:`list_source`) happens on the driver before any Ray work, so a missing or empty
source fails early. :func:`build_dataset` then returns a Ray Dataset whose map tasks read,
decode and transform the items in parallel: items are grouped into blocks of bounded output size
(``target_block_bytes``), one read+transform task per block, and the writer fused behind it.

Why not ``ray.data.read_binary_files`` for folders: for tiny files its per-file overhead
dominates. Its file-based datasource builds a one-row Arrow block per file (plus a ``path``
column, retry wrappers and compression inference per file), and with explicit paths the driver
first calls ``get_file_info`` once per path. Here the listing already has every path and each
map task reads its block's files with pyarrow and decodes them in the same loop, an order of
magnitude less CPU per file (README, "Preprocessing", has the measurement).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.data import storage
from pipelines.data.transforms import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageSpec,
    SplitSpec,
    gray_array_to_pixels,
    image_file_to_pixels,
    output_batch,
    rgb_array_to_pixels,
)
import ray
from ray.data.extensions import ArrowTensorArray

IDX_IMAGES_PATTERN = re.compile(r"^(?P<stem>.+)-images-idx3-ubyte(?P<gz>\.gz)?$")
#: IDX stems of the source's test split (Fashion-MNIST/MNIST ``t10k``, EMNIST ``...-test``).
IDX_TEST_STEM = re.compile(r"(?:^|[-_.])(?:t10k|test)$", re.IGNORECASE)
IDX_UBYTE = 0x08
#: CIFAR-10 binary batch files, and their record: 1 label byte + 3 x 32 x 32 pixel bytes.
CIFAR_BATCH_PATTERN = re.compile(r"^(?:data_batch_\d+|test_batch)\.bin$")
CIFAR_META_NAME = "batches.meta.txt"
CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
#: Top-level folders of an image tree that name splits (all of them must be among these).
SPLIT_FOLDERS = ("train", "val", "test")
#: Output columns of the dataset returned by :func:`build_dataset`.
DATASET_COLUMNS = ("image", "label", "split", "error", "file", "block")
#: Threads per read task fetching objects from S3 (I/O bound); local files are read in-line.
S3_READ_THREADS = 8


class SourceError(ValueError):
    """The source as a whole is unusable (missing, empty, or not a recognised layout)."""


@dataclass(frozen=True)
class IdxPart:
    """One file of records of an ``idx`` source (an images file and its labels file) or of a
    ``cifar10`` source (a batch file, labels inside).

    Attributes:
        images: path of the images (or batch) file relative to the source root.
        labels: path of the IDX labels file relative to the source root, or None.
        count: number of images in the file.
        rows, cols: image height and width in pixels.
        take: how many of the first images to use (``count`` unless ``--limit`` cut it).
        split: the split the source gives the file's images ("train" or "test").
    """

    images: str
    labels: str | None
    count: int
    rows: int
    cols: int
    take: int
    split: str = "train"

    @property
    def name(self) -> str:
        """Identity prefix of this file's items: the images file name without ``.gz``."""
        name = posixpath.basename(self.images)
        return name[:-3] if name.endswith(".gz") else name


@dataclass(frozen=True)
class SourceListing:
    """What :func:`list_source` found: enough to build the dataset and write the manifest.

    Attributes:
        root: where the source lives (a directory; for a single IDX or batch file, its parent).
        kind: "idx", "cifar10" or "images".
        files: (relative path, size in bytes) of every file considered, sorted.
        items: for "images", relative paths of the image files to read (after ``limit``).
        item_splits: for "images", the source's split of each item ("train", "val" or "test").
        idx_parts: for "idx" and "cifar10", the record files to read.
        classes: class names (sub-folders) whose index is the label; empty when unlabelled.
        has_labels: True when every item gets a label >= 0.
        rejected: files refused at listing time, as {"file": ..., "reason": ...}.
        limit: the ``--limit`` that was applied (per split), or None.
        split_folders: for "images", True when the top level is ``train/`` / ``val/`` / ``test/``.
        split_sources: per split the source defines, the relative paths it came from (files, or
            folders; "" is the root).
    """

    root: storage.Location
    kind: Literal["idx", "cifar10", "images"]
    files: tuple[storage.FileEntry, ...]
    items: tuple[str, ...] = ()
    item_splits: tuple[str, ...] = ()
    idx_parts: tuple[IdxPart, ...] = ()
    classes: tuple[str, ...] = ()
    has_labels: bool = False
    rejected: tuple[dict[str, str], ...] = field(default=())
    limit: int | None = None
    split_folders: bool = False
    split_sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """Number of items the job will try to convert."""
        if self.kind in ("idx", "cifar10"):
            return sum(part.take for part in self.idx_parts)
        return len(self.items)

    @property
    def has_own_val(self) -> bool:
        """True when the source defines a "val" split itself (then none is carved from train)."""
        return "val" in self.split_sources

    def class_of(self, item: str) -> str | None:
        """The class (sub-folder) name of an "images" item, or None for a file outside any."""
        inside = item.split("/", 1)[1] if self.split_folders else item
        return inside.split("/", 1)[0] if "/" in inside else None

    @property
    def checksum(self) -> str:
        """sha256 (hex) of the sorted listing ``relative path<TAB>size`` lines, plus the limit."""
        digest = hashlib.sha256()
        for entry in self.files:
            digest.update(f"{entry.relpath}\t{entry.size}\n".encode())
        digest.update(f"limit={self.limit}\n".encode())
        return digest.hexdigest()


def _is_hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def list_source(uri: str, *, limit: int | None = None, fail_on_error: bool = False) -> SourceListing:
    """List an ``idx`` or ``images`` source (local or ``s3://``), without reading any image.

    Args:
        uri: a directory, an ``s3://bucket/prefix``, a single ``*-images-idx3-ubyte[.gz]`` file or a
            single CIFAR-10 batch file.
        limit: use at most this many items of each split (the first ones of the sorted listing), or None.
        fail_on_error: raise on the first unusable file instead of recording it as rejected.

    Raises:
        SourceError: missing source, no usable items, or ``limit`` < 1.
        BadImageError: with ``fail_on_error``, naming the first unusable file.
    """
    if limit is not None and limit < 1:
        raise SourceError(f"limit must be >= 1, got {limit}")
    loc = storage.resolve(uri)
    kind = storage.file_type(loc)
    if kind == pafs.FileType.NotFound:
        raise SourceError(f"source {loc.uri} does not exist")
    if kind == pafs.FileType.File:
        if not IDX_IMAGES_PATTERN.match(loc.name) and not CIFAR_BATCH_PATTERN.match(loc.name):
            raise SourceError(
                f"source {loc.uri} is a file but not an IDX images file (*-images-idx3-ubyte[.gz]) or a "
                "CIFAR-10 batch (data_batch_<n>.bin, test_batch.bin); give a directory, an s3:// prefix or such a file"
            )
        parent = storage.Location(loc.fs, posixpath.dirname(loc.path), posixpath.dirname(loc.uri))
        entries = [e for e in storage.list_files(parent) if "/" not in e.relpath]
        if CIFAR_BATCH_PATTERN.match(loc.name):
            return _list_cifar(parent, entries, [loc.name], limit, fail_on_error)
        return _list_idx(parent, entries, [loc.name], limit, fail_on_error)
    entries = [e for e in storage.list_files(loc) if not _is_hidden(e.relpath)]
    if not entries:
        raise SourceError(f"source {loc.uri} is empty: no files found")
    idx_images = [e.relpath for e in entries if "/" not in e.relpath and IDX_IMAGES_PATTERN.match(e.relpath)]
    if idx_images:
        return _list_idx(loc, entries, idx_images, limit, fail_on_error)
    batches = [e.relpath for e in entries if "/" not in e.relpath and CIFAR_BATCH_PATTERN.match(e.relpath)]
    if batches:
        return _list_cifar(loc, entries, batches, limit, fail_on_error)
    return _list_images(loc, entries, limit, fail_on_error)


def _reject(rejected: list[dict[str, str]], file: str, reason: str, fail_on_error: bool) -> None:
    if fail_on_error:
        raise BadImageError(file, reason)
    rejected.append({"file": file, "reason": reason})


def _has_split_folders(entries: list[storage.FileEntry]) -> bool:
    """True when the top-level folders are all among ``SPLIT_FOLDERS`` and include train or test."""
    top = {e.relpath.split("/", 1)[0] for e in entries if "/" in e.relpath}
    return bool(top) and top <= set(SPLIT_FOLDERS) and bool(top & {"train", "test"})


def _list_images(
    root: storage.Location, entries: list[storage.FileEntry], limit: int | None, fail_on_error: bool
) -> SourceListing:
    split_folders = _has_split_folders(entries)
    rejected: list[dict[str, str]] = []
    groups: dict[str, list[storage.FileEntry]] = {}
    for entry in entries:
        if not split_folders:
            groups.setdefault("train", []).append(entry)
        elif "/" in entry.relpath:
            groups.setdefault(entry.relpath.split("/", 1)[0], []).append(entry)
        else:
            _reject(rejected, entry.relpath, "file outside the train/, val/ and test/ folders of a split tree", fail_on_error)
    kept: list[storage.FileEntry] = [e for e in entries if "/" not in e.relpath] if split_folders else []
    items: list[str] = []
    item_splits: list[str] = []
    for split in SPLIT_FOLDERS:
        group = groups.get(split, [])[:limit] if limit is not None else groups.get(split, [])
        kept += group
        for entry in group:
            extension = posixpath.splitext(entry.relpath)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                items.append(entry.relpath)
                item_splits.append(split)
            else:
                reason = f"unsupported file extension {extension or '(none)'!r}; expected one of {', '.join(IMAGE_EXTENSIONS)}"
                _reject(rejected, entry.relpath, reason, fail_on_error)
    if not items:
        raise SourceError(
            f"source {root.uri} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
            f"{len(rejected)} other file(s) found"
        )
    order = sorted(range(len(items)), key=lambda i: items[i])  # listing order: sorted relative paths
    items, item_splits = [items[i] for i in order], [item_splits[i] for i in order]
    listing = SourceListing(
        root=root,
        kind="images",
        files=tuple(sorted(kept, key=lambda e: e.relpath)),
        items=tuple(items),
        item_splits=tuple(item_splits),
        rejected=tuple(rejected),
        limit=limit,
        split_folders=split_folders,
        split_sources={split: (split if split_folders else "",) for split in SPLIT_FOLDERS if split in item_splits},
    )
    names = [listing.class_of(item) for item in items]
    classes = tuple(sorted({name for name in names if name is not None}))
    has_labels = bool(classes) and all(name is not None for name in names)
    return dataclasses.replace(listing, classes=classes, has_labels=has_labels)


def _open_stream(loc: storage.Location):
    compression = "gzip" if loc.path.endswith(".gz") else None
    return loc.fs.open_input_stream(loc.path, compression=compression)


def _read_idx_header(loc: storage.Location, ndim: int) -> tuple[tuple[int, ...], int]:
    """Read an IDX header (big-endian, see the IDX format spec) and count the data bytes after it.

    Returns:
        (dims, data_bytes): the dimension sizes and the number of bytes following the header.

    Raises:
        ValueError: with the reason when the file is empty, not IDX, not unsigned bytes, of the
            wrong rank, or has corrupt compression.
    """
    try:
        with _open_stream(loc) as stream:
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


def _list_idx(
    root: storage.Location,
    entries: list[storage.FileEntry],
    images_files: list[str],
    limit: int | None,
    fail_on_error: bool,
) -> SourceListing:
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
            _reject(rejected, images, str(error), fail_on_error)
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
        split_sources=_part_sources(parts),
    )


def _part_sources(parts: list[IdxPart]) -> dict[str, tuple[str, ...]]:
    return {split: tuple(p.images for p in parts if p.split == split) for split in ("train", "test")
            if any(p.split == split for p in parts)}


def _cifar_classes(root: storage.Location, names: set[str]) -> tuple[str, ...]:
    """Class names from ``batches.meta.txt`` (one a line), or () when it is absent or unreadable."""
    if CIFAR_META_NAME not in names:
        return ()
    try:
        text = storage.read_bytes(root.join(CIFAR_META_NAME)).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _list_cifar(
    root: storage.Location,
    entries: list[storage.FileEntry],
    batch_files: list[str],
    limit: int | None,
    fail_on_error: bool,
) -> SourceListing:
    """List CIFAR-10 binary batches: each file's size must be a positive multiple of the record."""
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
            _reject(rejected, name, reason, fail_on_error)
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
        split_sources=_part_sources(parts),
    )


# ----------------------------------------------------------------------------- Ray Data side


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


def input_blocks(listing: SourceListing, spec: ImageSpec, *, num_cpus: int, target_block_bytes: int) -> list[pa.Table]:
    """The input of each read/transform task, one small Arrow table per block, in listing order.

    For folders: columns "file", "label", "split", "block"; for IDX and CIFAR-10: one row per block
    with the file names, image size, split and the item range [start, stop). Sized by
    :func:`rows_per_block`.
    """
    per_block = rows_per_block(listing.num_items, 4 * math.prod(spec.shape), num_cpus, target_block_bytes)
    return _file_tables(listing, per_block) if listing.kind == "images" else _idx_chunk_tables(listing, per_block)


def block_reader(listing: SourceListing):
    """The task body for this kind of source: :func:`read_idx_chunks`, :func:`read_cifar_chunks`
    or :func:`read_image_files`."""
    return {"idx": read_idx_chunks, "cifar10": read_cifar_chunks, "images": read_image_files}[listing.kind]


def build_dataset(listing: SourceListing, options: ReadOptions, *, num_cpus: int, target_block_bytes: int):
    """A Ray Dataset with columns ``DATASET_COLUMNS`` for every listed item (bad items marked).

    Columns: "image" float32 [C,H,W] in [-1, 1] (zeros for rejected items), "label" int64 (-1
    where unknown), "split" str (the output split), "error" str ("" when fine, else the rejection reason), "file"
    str (the item's identity), "block" int64 (index of the block in listing order; names the
    shards, so their order follows the listing and a retried task rewrites the same files).

    Args:
        listing: from :func:`list_source`.
        options: what the tasks need (see :class:`ReadOptions`).
        num_cpus: CPUs of the cluster, used to size the blocks.
        target_block_bytes: upper bound on the image bytes of one block (memory per task).
    """
    tables = input_blocks(listing, options.spec, num_cpus=num_cpus, target_block_bytes=target_block_bytes)
    return ray.data.from_arrow(tables).map_batches(
        block_reader(listing), batch_size=None, batch_format="pyarrow", fn_kwargs={"options": options}
    )


def _file_tables(listing: SourceListing, per_block: int) -> list[pa.Table]:
    index = {name: i for i, name in enumerate(listing.classes)}
    items = list(listing.items)
    names = [listing.class_of(item) for item in items]
    labels = [index[name] if name is not None else -1 for name in names]
    splits = list(listing.item_splits)
    return [
        pa.table(
            {
                "file": items[start : start + per_block],
                "label": pa.array(labels[start : start + per_block], pa.int64()),
                "split": pa.array(splits[start : start + per_block], pa.string()),
                "block": pa.array([block] * len(items[start : start + per_block]), pa.int64()),
            }
        )
        for block, start in enumerate(range(0, len(items), per_block))
    ]


def _idx_chunk_tables(listing: SourceListing, per_block: int) -> list[pa.Table]:
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


def _read_range(loc: storage.Location, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file: a ranged read, or streamed through gzip.

    Raises:
        OSError: if the file is shorter than expected (it changed after listing).
    """
    if loc.path.endswith(".gz"):
        with _open_stream(loc) as stream:
            remaining = offset
            while remaining > 0:
                skipped = stream.read(min(remaining, 1 << 23))
                if not skipped:
                    break
                remaining -= len(skipped)
            data = stream.read(length) if remaining <= 0 else b""
    else:
        with loc.fs.open_input_file(loc.path) as handle:
            data = handle.read_at(length, offset)
    if len(data) != length:
        raise OSError(f"{loc.uri} changed after listing: expected {length} bytes at offset {offset}, got {len(data)}")
    return data


def read_idx_chunks(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for IDX sources: read image ranges [start, stop) and transform them.

    Input columns: "images", "labels" (relative paths, "" for none), "name" (identity prefix),
    "rows", "cols" (image size in the file), "start", "stop", "split" (the file's split).
    Output: the ``DATASET_COLUMNS`` (see :func:`build_dataset`).
    """
    outputs = []
    for row in batch.to_pylist():
        start, stop, rows, cols = row["start"], row["stop"], row["rows"], row["cols"]
        n = stop - start
        raw = _read_range(options.root.join(row["images"]), 16 + start * rows * cols, n * rows * cols)
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(n, rows, cols)
        if row["labels"]:
            labels = np.frombuffer(_read_range(options.root.join(row["labels"]), 8 + start, n), dtype=np.uint8)
        else:
            labels = np.full(n, -1)
        files = [f"{row['name']}:{i}" for i in range(start, stop)]
        pixels = gray_array_to_pixels(pixels, options.spec)
        outputs.append(output_batch(pixels, labels, files, [""] * n, options.split, row["split"]))
    return _to_table(outputs, batch.column("block")[0].as_py())


def read_cifar_chunks(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for CIFAR-10 binary batches: read records [start, stop) and transform them.

    Record i of a file is bytes [i * 3073, (i + 1) * 3073): the label byte, then 1024 R, 1024 G and
    1024 B bytes, each a 32x32 image in row-major order, so the record reshapes to [3, 32, 32] (RGB).
    Input columns as for :func:`read_idx_chunks` ("labels" unused). Output: the ``DATASET_COLUMNS``.
    """
    outputs = []
    for row in batch.to_pylist():
        start, stop = row["start"], row["stop"]
        n = stop - start
        raw = _read_range(options.root.join(row["images"]), start * CIFAR_RECORD_BYTES, n * CIFAR_RECORD_BYTES)
        records = np.frombuffer(raw, dtype=np.uint8).reshape(n, CIFAR_RECORD_BYTES)
        pixels = rgb_array_to_pixels(records[:, 1:].reshape(n, *CIFAR_SHAPE), options.spec)
        files = [f"{row['name']}:{i}" for i in range(start, stop)]
        outputs.append(output_batch(pixels, records[:, 0], files, [""] * n, options.split, row["split"]))
    return _to_table(outputs, batch.column("block")[0].as_py())


def _read_file(loc: storage.Location) -> bytes | OSError:
    try:
        return storage.read_bytes(loc)
    except OSError as error:
        return error


def read_image_files(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for folder sources: read, decode, check and transform each listed file.

    Input columns: "file" (path relative to the source root), "label" (int64).
    Output: the ``DATASET_COLUMNS``; a bad file gets zeros and its reason in "error", or raises
    ``BadImageError`` naming it when ``options.fail_on_error``.
    """
    files = batch.column("file").to_pylist()
    locations = [options.root.join(f) for f in files]
    if options.root.is_s3:
        with ThreadPoolExecutor(S3_READ_THREADS) as pool:
            contents = list(pool.map(_read_file, locations))
    else:
        contents = [_read_file(loc) for loc in locations]
    pixels = np.zeros((len(files), *options.spec.shape), dtype=np.uint8)
    errors = [""] * len(files)
    for i, (file, data) in enumerate(zip(files, contents)):
        try:
            if isinstance(data, OSError):
                raise ValueError(f"unreadable file ({data})")
            pixels[i] = image_file_to_pixels(data, options.spec)
        except ValueError as error:
            if options.fail_on_error:
                raise BadImageError(file, str(error)) from None
            errors[i] = str(error)
    labels = batch.column("label").to_numpy()
    origins = batch.column("split").to_pylist()
    return _to_table([output_batch(pixels, labels, files, errors, options.split, origins)], batch.column("block")[0].as_py())


def _to_table(outputs: list[dict[str, np.ndarray]], block: int) -> pa.Table:
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
