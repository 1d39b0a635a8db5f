"""Fixtures of the storage tests: a real S3 server on loopback and storages on it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import SecretStr

from imagegen.storage import LocalStorage, S3Options, S3Storage, s3_options
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

MakeS3 = Callable[..., S3Storage]


@pytest.fixture(autouse=True)
def _isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials, config or instance metadata of the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "IMAGEGEN_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Server]:
    """The S3 server, up, with no requests recorded yet."""
    s3_server.up()
    s3_server.clear()
    yield s3_server
    s3_server.up()


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


def fast_options(options: S3Options) -> S3Options:
    """One attempt, so an outage (a refused connection) fails a test at once.

    The timeouts leave room for a busy machine; a test of timeouts sets its own.
    """
    return replace(options, connect_timeout=2.0, read_timeout=5.0, max_attempts=1)


@pytest.fixture
def make_s3(s3: S3Server, bucket: str) -> MakeS3:
    """Build an S3Storage on the test server: ``make_s3(preset="gcs", prefix="p", ...)``."""

    def make(
        preset: str = "aws",
        *,
        prefix: str = "",
        bucket_name: str | None = None,
        **overrides: object,
    ) -> S3Storage:
        options = s3_options(
            preset,
            endpoint_url=s3.endpoint,
            access_key_id=SecretStr(ACCESS_KEY_ID),
            secret_access_key=SecretStr(SECRET_ACCESS_KEY),
        )
        options = replace(fast_options(options), **overrides)  # type: ignore[arg-type]
        return S3Storage(bucket_name or bucket, prefix, options)

    return make


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "output")
