"""Local and ``s3://`` paths behind one small API, built on ``pyarrow.fs``.

A *location* is a string: a local path (relative paths are made absolute) or ``s3://bucket/key``.
``resolve(location)`` turns it into a :class:`Location`: a pyarrow filesystem plus the path
inside it. Everything else here works on a ``Location`` so that the filesystem object, built
once on the driver, can be shipped to Ray workers (it pickles with its endpoint, region and any
explicit credentials, so workers need no environment of their own).

S3 settings come from the standard AWS environment variables. pyarrow's ``S3FileSystem()`` does
not read ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (checked with pyarrow 25), so the
endpoint is passed explicitly as ``endpoint_override``; this is what makes any S3-compatible
server (MinIO, moto, Ceph) work.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(location: str) -> bool:
    """True for ``s3://bucket/...`` locations."""
    return str(location).startswith(S3_SCHEME)


def s3_filesystem_from_env() -> pafs.S3FileSystem:
    """An ``S3FileSystem`` configured from the standard AWS environment variables.

    Reads ``AWS_ENDPOINT_URL_S3`` (then ``AWS_ENDPOINT_URL``) as the endpoint, ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` as the region, and ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
    ``AWS_SESSION_TOKEN`` when set (otherwise pyarrow's default AWS credential chain applies).
    """
    env = os.environ
    kwargs: dict[str, str] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path inside it.

    Attributes:
        fs: the pyarrow filesystem (``LocalFileSystem`` or ``S3FileSystem``).
        path: the path inside ``fs``: absolute POSIX path locally, ``bucket/key`` on S3.
        uri: the user-facing form: the absolute local path, or ``s3://bucket/key``.
    """

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        """True when this location is on S3."""
        return is_s3(self.uri)

    def join(self, *parts: str) -> Location:
        """The location of ``parts`` (POSIX, relative) below this one."""
        return Location(self.fs, posixpath.join(self.path, *parts), posixpath.join(self.uri, *parts))

    def sibling(self, suffix: str) -> Location:
        """A location next to this one whose last component is this one's name + ``suffix``."""
        return Location(self.fs, self.path + suffix, self.uri + suffix)

    def temporary_sibling(self, tag: str = "tmp") -> Location:
        """A fresh sibling ``<name>.<tag>-<uuid hex>`` (never taken for the real output)."""
        return self.sibling(f".{tag}-{uuid.uuid4().hex}")

    @property
    def name(self) -> str:
        """The last path component."""
        return posixpath.basename(self.path.rstrip("/"))


def resolve(location: str | os.PathLike[str]) -> Location:
    """Resolve a local path or ``s3://bucket/key`` into a :class:`Location`.

    Raises:
        ValueError: for an empty location or an ``s3://`` URI without a bucket.
    """
    text = os.fspath(location).strip()
    if not text:
        raise ValueError("expected a local path or s3://bucket/prefix, got an empty string")
    if is_s3(text):
        path = text[len(S3_SCHEME) :].strip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"expected s3://bucket[/prefix], got {text!r}")
        return Location(s3_filesystem_from_env(), path, S3_SCHEME + path)
    if "://" in text:
        raise ValueError(f"unsupported location {text!r}: use a local path or s3://bucket/prefix")
    absolute = Path(text).expanduser().resolve().as_posix()
    return Location(pafs.LocalFileSystem(), absolute, absolute)


def file_type(loc: Location) -> pafs.FileType:
    """``FileType.File``, ``Directory`` or ``NotFound`` (on S3 a prefix with objects is a Directory)."""
    return loc.fs.get_file_info(loc.path).type


def exists(loc: Location) -> bool:
    """True when a file or directory (on S3: any object under the prefix) exists at ``loc``."""
    return file_type(loc) != pafs.FileType.NotFound


@dataclass(frozen=True)
class FileEntry:
    """One file found by :func:`list_files`: its path relative to the listed root and its size in bytes."""

    relpath: str
    size: int


def list_files(loc: Location) -> list[FileEntry]:
    """All files below the directory ``loc`` (recursively), sorted by relative path.

    Raises:
        FileNotFoundError: if ``loc`` does not exist or is not a directory.
    """
    if file_type(loc) != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {loc.uri}")
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    prefix = loc.path.rstrip("/") + "/"
    entries = [
        FileEntry(info.path[len(prefix) :], int(info.size))
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(prefix)
    ]
    return sorted(entries, key=lambda e: e.relpath)


def read_bytes(loc: Location) -> bytes:
    """The whole content of the file at ``loc``.

    Raises:
        FileNotFoundError: if there is no file at ``loc``.
    """
    with loc.fs.open_input_stream(loc.path) as stream:
        return stream.read()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` to the file at ``loc``, creating parent directories (local) as needed.

    On S3 no directory marker objects are created: prefixes exist through their objects.
    """
    parent = posixpath.dirname(loc.path)
    if parent and not loc.is_s3:
        loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as stream:
        stream.write(data)


def remove_tree(loc: Location) -> None:
    """Delete the directory (on S3: every object under the prefix) at ``loc``; no-op if missing."""
    kind = file_type(loc)
    if kind == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)
    elif kind == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def remove_file(loc: Location) -> None:
    """Delete the file at ``loc``; no-op if missing."""
    if file_type(loc) == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def rename_local(src: Location, dst: Location) -> None:
    """Atomically rename ``src`` to ``dst`` on the local filesystem (same parent directory)."""
    if src.is_s3 or dst.is_s3:
        raise ValueError(f"rename_local needs local paths, got {src.uri} -> {dst.uri}")
    os.replace(src.path, dst.path)


def copy_file(src: Location, dst: Location) -> None:
    """Copy one file (server-side on S3)."""
    parent = posixpath.dirname(dst.path)
    if parent and not dst.is_s3:
        dst.fs.create_dir(parent, recursive=True)
    src.fs.copy_file(src.path, dst.path)
