"""A redirect from the endpoint, as a proxy in front of a store answers one (an ingress sending
``http://`` on to ``https://``): the recording proxy of tests/fakes/s3_server.py answering
nginx's ``301 Moved Permanently`` with a ``Location`` and an HTML body, to botocore unpatched.

botocore's region redirector (botocore/utils.py, ``S3RegionRedirectorv2``) asks HeadBucket for
the bucket's region on a 301 that names none, on the same client; a proxy answers that with
another 301, and so on until Python's recursion limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.utils import S3RegionRedirectorv2

from imagegen.errors import DependencyUnavailable
from imagegen.storage import GenerationKeys, S3Storage
from imagegen.storage._s3_client import _REDIRECTOR_EVENTS
from tests.conftest import RunCli
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.storage.conftest import MakeS3

KEYS = GenerationKeys("gen-0005", datetime(2026, 5, 1, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1024
ELSEWHERE = "https://store.example"


@pytest.mark.parametrize("preset", ["minio", "aws", "r2"])
@pytest.mark.parametrize(
    "attempt",
    [
        lambda s: s.put(KEYS.image, PNG, content_type="image/png"),
        lambda s: s.create(KEYS.image, PNG, content_type="image/png"),
        lambda s: s.get(KEYS.image),
        lambda s: s.head(KEYS.image),
        lambda s: s.check(),
    ],
    ids=["put", "create", "get", "head", "check"],
)
async def test_a_redirect_is_one_request_said_as_the_endpoint_to_fix(
    s3: S3Server,
    make_s3: MakeS3,
    preset: str,
    attempt: Callable[[S3Storage], Awaitable[object]],
) -> None:
    """A retryable 503 naming the endpoint and where it sends requests, after one request:
    a redirect is not retried, nor chased, whatever the preset at an endpoint not AWS's."""
    storage = make_s3(preset, max_attempts=3)
    s3.redirect = ELSEWHERE
    with pytest.raises(DependencyUnavailable) as error:
        await attempt(storage)

    assert type(error.value) is DependencyUnavailable
    assert error.value.retryable and error.value.status == 503
    message = error.value.message
    assert f"the endpoint {s3.endpoint} answered a redirect (301) to {ELSEWHERE}/" in message
    assert "set IMAGEGEN_S3_ENDPOINT_URL to the store's own address" in message
    assert len(s3.requests) == 1, [(r.method, r.path) for r in s3.requests]

    s3.up()
    await storage.put(KEYS.image, PNG, content_type="image/png")
    assert await storage.get(KEYS.image) == PNG


def _redirector_events(storage: S3Storage) -> list[str]:
    """The events on which the storage's client has botocore's region redirector."""
    events = storage._client.meta.events
    return [
        event
        for event in _REDIRECTOR_EVENTS
        for handler in events._emitter._handlers.prefix_search(event)
        if isinstance(getattr(handler, "__self__", None), S3RegionRedirectorv2)
    ]


@pytest.mark.parametrize(
    ("preset", "endpoint", "kept"),
    [
        # AWS's own: a bucket in another region is told by the header of every HeadBucket
        # answer, x-amz-bucket-region (API_HeadBucket.html), so the redirector asks once.
        ("aws", None, True),
        ("aws", "https://s3.eu-west-1.amazonaws.com", True),
        ("aws", "https://bucket.vpce-0a1b.s3.us-east-1.vpce.amazonaws.com", True),
        ("aws", "http://minio.example:9000", False),
        ("minio", "http://minio.example:9000", False),
        ("r2", "https://account.r2.cloudflarestorage.com", False),
        ("gcs", None, False),
    ],
)
def test_only_aws_endpoints_keep_botocores_region_redirect(
    preset: str, endpoint: str | None, kept: bool
) -> None:
    from pydantic import SecretStr

    from imagegen.storage import s3_options

    options = s3_options(
        preset,
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id=SecretStr(ACCESS_KEY_ID),
        secret_access_key=SecretStr(SECRET_ACCESS_KEY),
    )
    found = _redirector_events(S3Storage("images", "", options))
    assert found == (list(_REDIRECTOR_EVENTS) if kept else [])


def _doctor_rows(stdout: str) -> dict[str, dict[str, Any]]:
    return {row["check"]: row for row in json.loads(stdout)["checks"]}


def test_doctor_says_a_redirect_in_its_storage_row(cli: RunCli, s3: S3Server, bucket: str) -> None:
    s3.redirect = ELSEWHERE
    env = {
        "IMAGEGEN_STORAGE_URL": f"s3://{bucket}/images",
        "IMAGEGEN_S3_PRESET": "minio",
        "IMAGEGEN_S3_ENDPOINT_URL": s3.endpoint,
        "IMAGEGEN_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "IMAGEGEN_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
    }
    result = cli("doctor", "--json", env=env)

    assert result.returncode == 1, result.stderr
    assert "internal error" not in result.stderr
    row = _doctor_rows(result.stdout)["storage"]
    assert row["status"] == "error"
    assert f"the endpoint {s3.endpoint} answered a redirect (301)" in row["summary"]
    assert len(s3.requests) == 1


def test_every_partition_botocore_knows_is_aws() -> None:
    """The endpoints the redirector stays on: each AWS partition's hosts, dual-stack ones too
    (botocore/data/partitions.json), and no look-alike."""
    from pathlib import Path

    import botocore

    from imagegen.storage.presets import _on_aws

    data = json.loads((Path(botocore.__file__).parent / "data" / "partitions.json").read_text())
    suffixes = {
        suffix
        for partition in data["partitions"]
        for key in ("dnsSuffix", "dualStackDnsSuffix")
        if (suffix := partition["outputs"].get(key))
    }
    assert len(suffixes) >= 10
    for suffix in suffixes:
        assert _on_aws(f"https://s3.us-east-1.{suffix}"), suffix
        assert not _on_aws(f"https://s3.us-east-1.{suffix}.evil.example"), suffix
        assert not _on_aws(f"https://evil{suffix}"), suffix
