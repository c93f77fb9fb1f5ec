"""Driver side of the shards format: check whether an output exists, and publish a finished one
from its staging folder with ``manifest.json`` visible last (the commit protocol,
``pipelines/data/shards/__init__.py``, "The manifest is the commit marker").
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from pipelines.data import storage
from pipelines.data.shards.manifest import MANIFEST_NAME, Manifest


def output_exists(final: storage.Location) -> bool:
    """True when ``final`` holds anything (a non-empty folder, a file, or objects under the prefix)."""
    kind = storage.file_type(final)
    if kind == pafs.FileType.NotFound:
        return False
    if kind == pafs.FileType.Directory and not final.is_s3:
        return any(True for _ in final.fs.get_file_info(pafs.FileSelector(final.path)))
    return True


def publish(tmp: storage.Location, final: storage.Location, manifest: Manifest) -> None:
    """Commit a finished output from ``tmp`` to ``final``; the manifest becomes visible last.

    Shard files in ``tmp`` that the manifest does not list (e.g. from retried tasks) are not
    published. Any previous output at ``final`` is removed only now, after the new one is
    complete. Locally the switch is two renames; on S3 the old manifest is deleted first (so
    readers see "no output" rather than a mix), then the old objects, then the new shards are
    copied and ``manifest.json`` is written last.

    Raises:
        OSError: a local rename failed (the previous output, if any, is put back first).
    """
    listed = {s.path for files in manifest.shards.values() for s in files}
    manifest_bytes = json.dumps(manifest.to_dict(), indent=2).encode()
    if final.is_s3:
        _publish_s3(tmp, final, listed, manifest_bytes)
    else:
        _publish_local(tmp, final, listed, manifest_bytes)


def _publish_s3(tmp: storage.Location, final: storage.Location, listed: set[str], manifest_bytes: bytes) -> None:
    """Old manifest, then old objects, removed; the listed shards copied; ``manifest.json`` written last."""
    storage.remove_file(final.join(MANIFEST_NAME))
    storage.remove_tree(final)
    for relpath in sorted(listed):
        storage.copy_file(tmp.join(relpath), final.join(relpath))
    storage.write_bytes(final.join(MANIFEST_NAME), manifest_bytes)
    storage.remove_tree(tmp)


def _publish_local(tmp: storage.Location, final: storage.Location, listed: set[str], manifest_bytes: bytes) -> None:
    """Unlisted files dropped and the manifest written inside ``tmp``, then ``final`` swapped for it by renames."""
    for entry in storage.list_files(tmp):
        if entry.relpath not in listed:
            storage.remove_file(tmp.join(entry.relpath))
    storage.write_bytes(tmp.join(MANIFEST_NAME), manifest_bytes)
    old = final.temporary_sibling("old") if storage.exists(final) else None
    if old is not None:
        storage.rename_local(final, old)
    try:
        storage.rename_local(tmp, final)
    except OSError:
        if old is not None:
            storage.rename_local(old, final)
        raise
    if old is not None:
        storage.remove_tree(old)
