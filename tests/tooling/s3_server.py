"""A real S3-compatible HTTP server on loopback for tests: moto in server mode.

Plain helper :func:`running_s3_server` (a context manager yielding an :class:`S3Server`) plus
:func:`s3_server_fixture`, a factory for pytest fixtures of any scope. ``S3Server.env()`` gives
the standard AWS variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_REGION``) that reach it: hand them to a
job (``runtime_env={"env_vars": server.env()}``) or, with ``set_environ=True``, have them set
in this process while the server runs (restored afterwards), so boto3, pyarrow (through
``pipelines.data.storage``) and MLflow here talk to it. Ray processes that are already running do not
see later changes of this process's environment.

    s3 = s3_server_fixture(scope="module")          # in a test module

    def test_x(s3):
        s3.create_bucket("data")
        uri = s3.upload_folder(local_folder, "data", "images")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer


@dataclass(frozen=True)
class S3Server:
    """A running moto S3 server: its endpoint and the credentials/region that reach it."""

    endpoint_url: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket (no-op if it exists); return ``s3://name``."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Upload every file below ``folder`` to ``s3://bucket/prefix/<relative path>``; return that URI."""
        client = self.client()
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """All object keys under ``prefix`` in ``bucket``, sorted."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)


@contextmanager
def running_s3_server(*, set_environ: bool = False, region: str = "us-east-1") -> Iterator[S3Server]:
    """Run moto's S3 server on 127.0.0.1 at a free port until the block ends.

    Args:
        set_environ: also point this process's AWS variables at the server meanwhile
            (``AWS_SESSION_TOKEN``/``AWS_PROFILE`` are unset), restoring them afterwards.
        region: the region reported in ``env()``.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint_url=f"http://{host}:{port}", region=region)
    names = [*s3.env(), "AWS_SESSION_TOKEN", "AWS_PROFILE"]
    saved = {name: os.environ.get(name) for name in names}
    if set_environ:
        os.environ.update(s3.env())
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
    try:
        yield s3
    finally:
        if set_environ:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        server.stop()


def s3_server_fixture(scope: str = "module", set_environ: bool = True):
    """A pytest fixture of ``scope`` yielding a running :class:`S3Server` (see :func:`running_s3_server`)."""

    @pytest.fixture(scope=scope)
    def s3_server() -> Iterator[S3Server]:
        with running_s3_server(set_environ=set_environ) as server:
            yield server

    return s3_server
