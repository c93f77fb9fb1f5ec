"""Byte ranges of a source file (local or ``s3://``, plain or gzip): what the record formats (IDX,
CIFAR-10) read inside their Ray tasks.
"""

from __future__ import annotations

from pipelines.data import storage


def open_stream(loc: storage.Location):
    """A pyarrow input stream of the file, decompressed when its name ends in ``.gz``."""
    compression = "gzip" if loc.path.endswith(".gz") else None
    return loc.fs.open_input_stream(loc.path, compression=compression)


def read_range(loc: storage.Location, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file: a ranged read, or streamed through gzip.

    Raises:
        OSError: if the file is shorter than expected (it changed after listing).
    """
    if loc.path.endswith(".gz"):
        with open_stream(loc) as stream:
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
