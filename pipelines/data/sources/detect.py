"""Recognise a source's format from its listing and list it with that format's module (on the
driver, before any Ray work, so a missing or empty source fails early).
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from pipelines.data import storage
from pipelines.data.sources.cifar10 import CIFAR_BATCH_PATTERN, list_cifar
from pipelines.data.sources.idx import IDX_IMAGES_PATTERN, list_idx
from pipelines.data.sources.image_folder import list_images
from pipelines.data.sources.listing import SourceError, SourceListing


def _is_hidden(relpath: str) -> bool:
    """True for a path with a dot-file or dot-folder part (``.DS_Store``, ``.git/...``): never read."""
    return any(part.startswith(".") for part in relpath.split("/"))


def list_source(uri: str, *, limit: int | None = None, fail_on_error: bool = False) -> SourceListing:
    """List an ``idx``, ``cifar10`` or ``images`` source (local or ``s3://``), without reading any image.

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
            return list_cifar(parent, entries, [loc.name], limit, fail_on_error)
        return list_idx(parent, entries, [loc.name], limit, fail_on_error)
    entries = [e for e in storage.list_files(loc) if not _is_hidden(e.relpath)]
    if not entries:
        raise SourceError(f"source {loc.uri} is empty: no files found")
    idx_images = [e.relpath for e in entries if "/" not in e.relpath and IDX_IMAGES_PATTERN.match(e.relpath)]
    if idx_images:
        return list_idx(loc, entries, idx_images, limit, fail_on_error)
    batches = [e.relpath for e in entries if "/" not in e.relpath and CIFAR_BATCH_PATTERN.match(e.relpath)]
    if batches:
        return list_cifar(loc, entries, batches, limit, fail_on_error)
    return list_images(loc, entries, limit, fail_on_error)
