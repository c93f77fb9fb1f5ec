"""What listing a source yields, whatever its format: :class:`SourceListing` (with its record files,
:class:`IdxPart`), :class:`SourceError`, and the helpers the format modules share.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from typing import Literal

from pipelines.data import storage
from pipelines.data.transforms import BadImageError


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
    """What ``detect.list_source`` found: enough to build the dataset and write the manifest.

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


def reject(rejected: list[dict[str, str]], file: str, reason: str, fail_on_error: bool) -> None:
    """Record ``file`` as rejected for ``reason`` in ``rejected``.

    Raises:
        BadImageError: instead, when ``fail_on_error``.
    """
    if fail_on_error:
        raise BadImageError(file, reason)
    rejected.append({"file": file, "reason": reason})


def record_split_sources(parts: list[IdxPart]) -> dict[str, tuple[str, ...]]:
    """``SourceListing.split_sources`` of a record source: per split present, its files in order."""
    return {split: tuple(p.images for p in parts if p.split == split) for split in ("train", "test")
            if any(p.split == split for p in parts)}
