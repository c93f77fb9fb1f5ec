"""Image-folder sources: a tree of PNG/JPEG/BMP/TIFF/WebP files, listed on the driver and read,
decoded and checked file by file in Ray tasks.

When the tree's top-level folders are ``train/`` and/or ``test/`` (and optionally ``val/``), and
nothing else, those are the splits and the level below them the classes; otherwise everything is
"train". Files directly inside the (split) folder have no label (-1); each sub-folder of it is a
class, sorted names (over all splits) -> 0..K-1, and everything below it carries that label. An
item's identity is its relative path.
"""

from __future__ import annotations

import dataclasses
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipelines.data import storage
from pipelines.data.sources.blocks import ReadOptions, to_table
from pipelines.data.sources.listing import SourceError, SourceListing, reject
from pipelines.data.transforms import IMAGE_EXTENSIONS, BadImageError, image_file_to_pixels, output_batch

#: Top-level folders of an image tree that name splits (all of them must be among these).
SPLIT_FOLDERS = ("train", "val", "test")
#: Threads per read task fetching objects from S3 (I/O bound); local files are read in-line.
S3_READ_THREADS = 8


def _has_split_folders(entries: list[storage.FileEntry]) -> bool:
    """True when the top-level folders are all among ``SPLIT_FOLDERS`` and include train or test."""
    top = {e.relpath.split("/", 1)[0] for e in entries if "/" in e.relpath}
    return bool(top) and top <= set(SPLIT_FOLDERS) and bool(top & {"train", "test"})


def list_images(
    root: storage.Location, entries: list[storage.FileEntry], limit: int | None, fail_on_error: bool
) -> SourceListing:
    """List an image tree: its splits (``SPLIT_FOLDERS`` or all "train"), classes and image files.

    Args:
        root: the source folder.
        entries: the files of ``root`` (relative paths and sizes), hidden ones left out.
        limit: use at most this many files of each split (sorted listing), or None.
        fail_on_error: raise on the first unusable file instead of recording it as rejected.

    Raises:
        SourceError: no image file at all.
        BadImageError: with ``fail_on_error``, naming the first unusable file.
    """
    split_folders = _has_split_folders(entries)
    rejected: list[dict[str, str]] = []
    groups: dict[str, list[storage.FileEntry]] = {}
    for entry in entries:
        if not split_folders:
            groups.setdefault("train", []).append(entry)
        elif "/" in entry.relpath:
            groups.setdefault(entry.relpath.split("/", 1)[0], []).append(entry)
        else:
            reject(rejected, entry.relpath, "file outside the train/, val/ and test/ folders of a split tree", fail_on_error)
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
                reject(rejected, entry.relpath, reason, fail_on_error)
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


def file_blocks(listing: SourceListing, per_block: int) -> list[pa.Table]:
    """The input tables of the read tasks, ``per_block`` files each in listing order: columns "file"
    (relative path), "label" int64 (-1 outside any class), "split" str (the source's), "block" int64."""
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


def _read_file(loc: storage.Location) -> bytes | OSError:
    """The file's bytes, or the error reading it (reported per file, not raised)."""
    try:
        return storage.read_bytes(loc)
    except OSError as error:
        return error


def read_image_files(batch: pa.Table, options: ReadOptions) -> pa.Table:
    """Ray task body for folder sources: read, decode, check and transform each listed file.

    Input columns: "file" (path relative to the source root), "label" (int64).
    Output: the ``blocks.DATASET_COLUMNS``; a bad file gets zeros and its reason in "error", or raises
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
    return to_table([output_batch(pixels, labels, files, errors, options.split, origins)], batch.column("block")[0].as_py())
