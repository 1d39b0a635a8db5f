"""S3Storage against moto over real HTTP, through boto3 and botocore unpatched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import select
import signal
import socket
import struct
import threading
import time
import traceback
import uuid
import warnings
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from imagegen._threads import DaemonPool
from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    ImageGenError,
    InternalError,
)
from imagegen.storage import GenerationKeys, S3Storage, s3_options
from imagegen.storage._s3_client import _instrument_botocore
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, RecordedRequest, S3Server
from tests.storage.conftest import MakeS3, fast_options

KEYS = GenerationKeys("gen-0002", datetime(2026, 5, 1, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 4096
SECRET = "very-secret-key-value-9f3a"
KEY_ID = "AKIAEXAMPLEKEYID1234"
PROBE_KEY = "imagegen-check/create-if-absent"

# Headers of botocore's flexible checksums (header or aws-chunked trailer forms).
CHECKSUM_HEADERS = ("x-amz-sdk-checksum-algorithm", "x-amz-trailer", "x-amz-decoded-content-length")


def probe(request: RecordedRequest) -> bool:
    """Whether ``request`` is the check of conditional writes a storage makes once."""
    return f"/{PROBE_KEY}" in request.path


def checksum_headers(request: RecordedRequest) -> dict[str, str]:
    return {
        name: value
        for name, value in request.headers.items()
        if name.startswith("x-amz-checksum-")
        or name in CHECKSUM_HEADERS
        or (name == "content-encoding" and "aws-chunked" in value)
    }


# 1. Objects, keys and prefixes


async def test_prefix_is_prepended_to_keys(s3: S3Server, bucket: str, make_s3: MakeS3) -> None:
    storage = make_s3(prefix="/images/v1/")

    await storage.put(KEYS.image, PNG, content_type="image/png")

    assert storage.prefix == "images/v1"
    assert storage.location(KEYS.image) == f"s3://{bucket}/images/v1/2026/05/01/gen-0002.png"
    listed = s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in listed] == ["images/v1/2026/05/01/gen-0002.png"]
    stored = s3.client().head_object(Bucket=bucket, Key="images/v1/2026/05/01/gen-0002.png")
    assert stored["ContentType"] == "image/png"


async def test_metadata_travels_as_x_amz_meta_headers(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3()

    await storage.put(KEYS.image, PNG, content_type="image/png", metadata={"sha256": "abc"})

    (put,) = [r for r in s3.requests if r.method == "PUT"]
    assert put.header("x-amz-meta-sha256") == "abc"
    assert put.header("content-type") == "image/png"
    assert put.body == PNG


async def test_location_without_prefix(bucket: str, make_s3: MakeS3) -> None:
    assert make_s3().location("a/b.png") == f"s3://{bucket}/a/b.png"


def test_from_url(bucket: str) -> None:
    storage = S3Storage.from_url(f"s3://{bucket}/some/prefix/")
    assert (storage.bucket, storage.prefix) == (bucket, "some/prefix")
    assert storage.location("k.png") == f"s3://{bucket}/some/prefix/k.png"


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3://Bad_Bucket",
        "s3://b/../x",
        "s3://key:secret@bucket",
        "s3://bucket:9000/x",
        "gs://b",
    ],
)
def test_from_url_rejects(url: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        S3Storage.from_url(url)
    assert error.value.fields == ["storage_url"]


# 2. What reaches the server, per preset


async def test_gcs_preset_sends_no_flexible_checksum_headers(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3("gcs")

    await storage.put(KEYS.image, PNG, content_type="image/png", metadata={"sha256": "abc"})
    assert await storage.get(KEYS.image) == PNG
    assert await storage.head(KEYS.image) is not None

    requests = s3.requests
    assert [r.method for r in requests] == ["PUT", "GET", "HEAD"]
    for request in requests:
        assert checksum_headers(request) == {}, request
        assert request.header("x-amz-checksum-mode") is None
        # SigV4 (HMAC keys) with the region GCS expects, path-style addressing.
        authorization = request.header("authorization") or ""
        assert authorization.startswith("AWS4-HMAC-SHA256 ")
        assert "/auto/s3/aws4_request" in authorization
        assert request.path.startswith(f"/{storage.bucket}/2026/05/01/")
    # The body is still checked end to end, by the header GCS does accept.
    assert requests[0].header("content-md5")


async def test_aws_preset_sends_checksum_headers(s3: S3Server, make_s3: MakeS3) -> None:
    # Proves the assertion above can fail: a current botocore adds them by default.
    await make_s3("aws").put(KEYS.image, PNG, content_type="image/png")

    (put,) = s3.requests
    assert checksum_headers(put) != {}


@pytest.mark.parametrize("preset", ["aws", "r2", "minio"])
async def test_create_is_one_put_with_if_none_match(
    s3: S3Server, make_s3: MakeS3, preset: str
) -> None:
    storage = make_s3(preset)
    assert await storage.create(KEYS.image, PNG, content_type="image/png")
    assert not await storage.create(KEYS.image, b"late", content_type="image/png")

    puts = [r for r in s3.requests if r.method == "PUT"]
    # Before the first: the check that the store honours the precondition, with it too.
    assert [probe(r) for r in puts] == [True, True, False, False]
    assert [(r.header("if-none-match"), r.header("x-goog-if-generation-match")) for r in puts] == [
        ("*", None)
    ] * 4
    assert await storage.get(KEYS.image) == PNG


async def test_gcs_create_uses_the_generation_precondition(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3("gcs")
    assert await storage.create(KEYS.image, PNG, content_type="image/png")
    assert not await storage.create(KEYS.image, b"late", content_type="image/png")
    await storage.put(KEYS.thumbnail, PNG, content_type="image/png")

    puts = [r for r in s3.requests if r.method == "PUT" and not probe(r)]
    conditions = [(r.header("if-none-match"), r.header("x-goog-if-generation-match")) for r in puts]
    # GCS applies If-None-Match to reads only; a plain put carries no precondition at all.
    assert conditions == [(None, "0"), (None, "0"), (None, None)]
    # The header is signed like the others.
    assert "x-goog-if-generation-match" in (puts[0].header("authorization") or "")
    assert await storage.get(KEYS.image) == PNG


async def test_create_retries_a_conditional_conflict(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3()
    await storage.check()  # the check of conditional writes, done
    s3.clear()
    s3.down(status=409, count=2)

    assert await storage.create(KEYS.image, PNG, content_type="image/png")
    assert [r.method for r in s3.requests] == ["PUT", "PUT", "PUT"]


async def test_r2_and_minio_presets_round_trip(s3: S3Server, make_s3: MakeS3) -> None:
    for preset in ("r2", "minio"):
        storage = make_s3(preset)
        await storage.put(KEYS.image, PNG, content_type="image/png")
        assert await storage.get(KEYS.image) == PNG
    r2_put, _, minio_put, _ = s3.requests
    assert "/auto/s3/aws4_request" in (r2_put.header("authorization") or "")
    # No flexible checksums, so no aws-chunked body over HTTPS either, which MinIO before
    # RELEASE.2023-05-18T00-05-36Z answers 411 (minio/minio#16484); Content-MD5 checks the body.
    for put in (r2_put, minio_put):
        assert checksum_headers(put) == {}
        assert put.header("content-md5") and put.header("content-length") == str(len(PNG))


# 3. A store that ignores the upload precondition


@pytest.mark.parametrize("preset", ["aws", "r2", "minio", "gcs"])
async def test_a_store_that_honours_conditional_writes_is_checked_once(
    s3: S3Server, bucket: str, make_s3: MakeS3, preset: str
) -> None:
    """moto honours If-None-Match: * on PutObject (moto/s3/responses.py, put_object), and the
    proxy models GCS's x-goog-if-generation-match: 0 with it."""
    storage = make_s3(preset)
    assert await storage.create(KEYS.image, PNG, content_type="image/png")
    assert await storage.create(KEYS.metadata, b"{}", content_type="application/json")

    probes = [(r.method, probe(r)) for r in s3.requests]
    # Created, then refused (412): proof enough, and never asked again by this storage.
    assert probes == [("PUT", True), ("PUT", True), ("PUT", False), ("PUT", False)]
    # The probe key stays, written once: nothing deletes (docs/storage.md#permissions).
    assert s3.client().head_object(Bucket=bucket, Key=PROBE_KEY)["ContentType"] == "text/plain"
    s3.clear()
    again = make_s3(preset)  # another process: the key left by the first is refusal enough
    assert not await again.create(KEYS.image, b"late", content_type="image/png")
    assert [probe(r) for r in s3.requests] == [True, False]


@pytest.mark.parametrize("preset", ["aws", "minio", "gcs"])
async def test_a_store_that_ignores_conditional_writes_is_refused_before_the_first_create(
    s3: S3Server, bucket: str, make_s3: MakeS3, preset: str
) -> None:
    """MinIO before RELEASE.2024-05-07T06-41-25Z (minio/minio#19682), or GCS behind a host
    the presets do not know under the aws or minio preset: every create would be answered as
    done, so two writers of a key would both win, two images and two replies."""
    storage = make_s3(preset)
    s3.ignores_conditions = True

    with pytest.raises(ConfigurationError) as error:
        await storage.create(KEYS.image, PNG, content_type="image/png")

    assert error.value.retryable and error.value.fields == ["s3_preset"]
    message = error.value.message
    assert "does not honour conditional writes" in message
    if preset == "gcs":
        # Already set: the advice to set it would go round in a circle.
        assert "set IMAGEGEN_S3_PRESET=gcs" not in message
        assert "does not behave as Google Cloud Storage" in message
        assert "the preset of the store actually run" in message
        assert "x-goog-if-generation-match: 0" in message
    else:
        assert "set IMAGEGEN_S3_PRESET=gcs" in message
        assert "MinIO RELEASE.2024-05-07T06-41-25Z" in message
        assert "If-None-Match: *" in message
    # Nothing of the generation was written.
    assert [probe(r) for r in s3.requests] == [True, True]
    with pytest.raises(ConfigurationError):  # not cached: asked again, and refused again
        await storage.check()
    s3.ignores_conditions = False  # the store is upgraded: the next create goes through
    assert await storage.create(KEYS.image, PNG, content_type="image/png")


async def test_two_writers_on_a_store_that_ignores_conditional_writes_both_fail(
    s3: S3Server, bucket: str, make_s3: MakeS3
) -> None:
    """Two replicas racing on one key must not both be told they won."""
    s3.ignores_conditions = True
    first, second = make_s3("minio"), make_s3("minio")

    results = await asyncio.gather(
        first.create(KEYS.image, b"A", content_type="image/png"),
        second.create(KEYS.image, b"B", content_type="image/png"),
        return_exceptions=True,
    )

    assert [type(result) for result in results] == [ConfigurationError, ConfigurationError]
    assert not [r for r in s3.requests if r.path.endswith(KEYS.image)]


async def test_check_says_the_store_ignores_conditional_writes(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """What `imagegen doctor` calls: it says so before any generation is stored."""
    s3.ignores_conditions = True
    with pytest.raises(ConfigurationError) as error:
        await make_s3("minio").check()
    assert "IMAGEGEN_S3_PRESET" in error.value.message


async def test_the_check_of_conditional_writes_fails_retryably_when_the_store_does(
    s3: S3Server, make_s3: MakeS3
) -> None:
    storage = make_s3()
    s3.down(status=503, count=1)
    with pytest.raises(DependencyUnavailable):
        await storage.create(KEYS.image, PNG, content_type="image/png")
    assert await storage.create(KEYS.image, PNG, content_type="image/png")


@pytest.mark.parametrize("there", [False, True], ids=["new-bucket", "probe-key-left"])
async def test_concurrent_first_creates_share_one_check(
    s3: S3Server, make_s3: MakeS3, there: bool
) -> None:
    """A burst of events at start-up: each create waits for the one check, which writes the
    probe key twice at most. R2 and GCS take about one write a second of a key (429 above:
    developers.cloudflare.com/r2/platform/limits), so one probe per create failed the burst."""
    if there:
        await make_s3().check()  # what an earlier process left
        s3.clear()
    storage = make_s3("r2")

    results = await asyncio.gather(
        *(storage.create(f"2026/05/01/g{i}.json", b"{}", content_type="x/y") for i in range(12))
    )

    assert results == [True] * 12
    puts = [probe(r) for r in s3.requests if r.method == "PUT"]
    assert puts == ([True] if there else [True, True]) + [False] * 12


async def test_one_check_is_shared_across_event_loops(s3: S3Server, make_s3: MakeS3) -> None:
    """A storage used from loops on other threads too (a CLI's asyncio.run, a function's loop
    thread) still checks once: the second loop's creates wait for the first loop's check."""
    storage = make_s3()
    s3.gate(PROBE_KEY, 2, timeout=2.0)  # holds the first probe until a second comes, or 2 s
    results: dict[str, list[bool]] = {}

    def burst(name: str) -> None:
        keys = [f"2026/05/01/{name}{i}.json" for i in range(4)]
        creates = (storage.create(key, b"{}", content_type="x/y") for key in keys)
        results[name] = asyncio.run(_gather(creates))

    first = threading.Thread(target=burst, args=("a",))
    first.start()
    while not any(probe(r) for r in s3.requests):  # the first loop's check is in flight
        await asyncio.sleep(0.01)
    second = threading.Thread(target=burst, args=("b",))
    second.start()
    await asyncio.to_thread(first.join, 30)
    await asyncio.to_thread(second.join, 30)

    assert results == {"a": [True] * 4, "b": [True] * 4}
    assert [probe(r) for r in s3.requests if r.method == "PUT"] == [True, True] + [False] * 8


async def _gather(calls: Iterator[Awaitable[bool]]) -> list[bool]:
    return list(await asyncio.gather(*calls))


async def test_a_failed_check_fails_those_waiting_on_it_and_is_not_remembered(
    s3: S3Server, make_s3: MakeS3
) -> None:
    storage = make_s3()
    s3.down(status=503, count=1)

    results = await asyncio.gather(
        *(storage.create(f"2026/05/01/g{i}.json", b"{}", content_type="x/y") for i in range(5)),
        return_exceptions=True,
    )

    assert [type(result) for result in results] == [DependencyUnavailable] * 5
    assert [probe(r) for r in s3.requests] == [True]  # one check, refused, for all five
    assert await storage.create(KEYS.image, PNG, content_type="image/png")  # asked again
    assert [probe(r) for r in s3.requests] == [True, True, True, False]


async def test_a_check_whose_caller_is_cancelled_is_taken_over(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """The create that runs the check may be cancelled (its request timed out): one of those
    waiting runs it, rather than all of them failing or waiting for ever."""
    storage = make_s3()
    # The first probe waits here for the second, or 2 s (less than the read timeout): the
    # gate is a barrier, so a third probe waits as long.
    s3.gate(PROBE_KEY, 2, timeout=2.0)
    first = asyncio.create_task(storage.create(KEYS.image, PNG, content_type="image/png"))
    while not any(probe(r) for r in s3.requests):
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(storage.create(KEYS.metadata, b"{}", content_type="x/y"))
    await asyncio.sleep(0.05)  # the second create waits for the check in flight
    assert [probe(r) for r in s3.requests] == [True]

    first.cancel()

    assert await asyncio.wait_for(waiting, 10)
    with pytest.raises(asyncio.CancelledError):
        await first
    # The cancelled create's probe had been sent, and goes through the gate with the second
    # one's: the store takes them in either order. Where the second create's was refused,
    # that is proof enough; where it created the key, it asks once more, to be refused.
    puts = [probe(r) for r in s3.requests if r.method == "PUT"]
    assert puts in ([True, True, False], [True, True, True, False])


# 4. Failures


async def test_storage_down_is_retryable_and_fast_then_recovers(
    s3: S3Server, make_s3: MakeS3
) -> None:
    storage = make_s3()
    await storage.put(KEYS.image, PNG, content_type="image/png")

    with s3.outage():
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as error:
            await storage.get(KEYS.image)
        assert time.monotonic() - started < 2
        with pytest.raises(DependencyUnavailable):
            await storage.check()

    assert error.value.retryable
    assert error.value.status == 503
    assert storage.bucket in error.value.message
    assert await storage.get(KEYS.image) == PNG
    await storage.check()


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_retryable(s3: S3Server, make_s3: MakeS3, status: int) -> None:
    storage = make_s3()

    with s3.outage(status=status), pytest.raises(DependencyUnavailable) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")

    assert error.value.retryable
    assert storage.bucket in error.value.message
    assert ("SlowDown" if status == 503 else "InternalError") in error.value.message


async def test_read_timeout_is_retryable(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3(read_timeout=0.3)

    with s3.outage(hang=True):
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as error:
            await storage.head(KEYS.image)
        assert time.monotonic() - started < 2

    assert "ReadTimeout" in error.value.message


async def test_botocore_retries_a_transient_failure(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3(max_attempts=3)
    s3.down(status=503, count=1)

    await storage.put(KEYS.image, PNG, content_type="image/png")

    assert [r.method for r in s3.requests] == ["PUT", "PUT"]
    assert await storage.get(KEYS.image) == PNG


async def test_missing_bucket_says_so(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3(bucket_name="no-such-bucket-here")

    for attempt in (
        storage.put(KEYS.image, PNG, content_type="image/png"),
        storage.get(KEYS.image),
        storage.check(),
    ):
        with pytest.raises(DependencyUnavailable) as error:
            await attempt
        assert "'no-such-bucket-here' does not exist" in error.value.message


async def test_an_endpoints_password_is_never_said(s3: S3Server, make_s3: MakeS3) -> None:
    # boto3 connects to an endpoint written with a user and password; messages say where
    # without them (imagegen._redact.redact_url).
    scheme, rest = s3.endpoint.split("://")
    storage = make_s3(
        bucket_name="no-such-bucket-here", endpoint_url=f"{scheme}://me:pw-in-url@{rest}"
    )

    with pytest.raises(DependencyUnavailable) as error:
        await storage.check()
    assert "does not exist at" in error.value.message and rest in error.value.message
    assert "pw-in-url" not in error.value.message


@pytest.mark.parametrize("how", ["refused", "unanswered", "query"])
async def test_no_error_chain_carries_the_endpoints_secret(
    s3: S3Server, make_s3: MakeS3, how: str
) -> None:
    """botocore's own errors quote the endpoint URL as configured, its password or query token
    included (``Could not connect to the endpoint URL: "http://me:hunter2@…"``, ``Read timeout
    on endpoint URL: …``, ``Custom endpoint `…?token=hunter2` was not a valid URI``). A 5xx is
    recorded with its whole traceback, causes included (imagegen.telemetry.record_error): the
    chain of what the storage raises says their type, never their text."""
    secret = f"pw-{uuid.uuid4().hex}"  # made here: the traceback quotes this file's lines
    scheme, rest = s3.endpoint.split("://")
    endpoint = f"{scheme}://me:{secret}@{rest}"
    if how == "query":  # refused by botocore itself, before any connection
        endpoint = f"{s3.endpoint}/?token={secret}"
    storage = make_s3(endpoint_url=endpoint, read_timeout=0.3)
    failure, outage = {
        "refused": ("EndpointConnectionError", s3.outage),
        "unanswered": ("ReadTimeoutError", functools.partial(s3.outage, hang=True)),
        "query": ("EndpointResolutionError", contextlib.nullcontext),
    }[how]

    for attempt in (lambda: storage.get(KEYS.image), storage.check):
        with outage(), pytest.raises(DependencyUnavailable) as error:
            await attempt()

        assert secret not in "".join(traceback.format_exception(error.value))
    assert failure in str(error.value) or "does not answer within 0.3s" in str(error.value)


def test_an_endpoint_botocore_refuses_is_named_not_quoted(make_s3: MakeS3) -> None:
    """botocore refuses an endpoint it cannot parse with ``ValueError("Invalid endpoint:
    <the URL>")`` as the client is made."""
    secret = f"pw-{uuid.uuid4().hex}"
    with pytest.raises(ConfigurationError) as error:
        make_s3(endpoint_url=f"http://me:{secret}@store example:9000")

    assert error.value.fields == ["s3_endpoint_url"]
    assert secret not in "".join(traceback.format_exception(error.value))


def test_a_region_botocore_refuses_is_a_configuration_error(make_s3: MakeS3) -> None:
    """botocore refuses a region that is not a DNS label (InvalidRegionError) as the client is
    made: the setting to fix, not an internal error."""
    with pytest.raises(ConfigurationError) as error:
        make_s3(region="eu west 1")

    assert error.value.fields == ["s3_region"]
    assert error.value.message == "invalid IMAGEGEN_S3_REGION: not a region botocore accepts"


def test_a_set_region_or_endpoint_is_named_over_botocore_s_own(
    make_s3: MakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The setting, where one is given, is what botocore used and refused: not the AWS_*
    variables it would otherwise read, here valid."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")

    with pytest.raises(ConfigurationError) as region:
        make_s3(region="eu west 1")
    with pytest.raises(ConfigurationError) as endpoint:
        make_s3(endpoint_url="http://store example:9000")

    assert region.value.fields == ["s3_region"]
    assert endpoint.value.fields == ["s3_endpoint_url"]
    assert endpoint.value.message == "invalid IMAGEGEN_S3_ENDPOINT_URL: not a URL botocore accepts"


@pytest.mark.parametrize(
    ("variable", "value", "field", "said"),
    [
        ("AWS_DEFAULT_REGION", "eu west 1", "aws_region", "AWS_DEFAULT_REGION or the AWS config"),
        (
            "AWS_ENDPOINT_URL",
            "http://me:{secret}@store example:9000",
            "aws_endpoint_url",
            "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL",
        ),
        (
            "AWS_ENDPOINT_URL_S3",
            "http://me:{secret}@store example:9000",
            "aws_endpoint_url",
            "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL",
        ),
    ],
)
def test_a_region_or_endpoint_botocore_read_itself_is_said_to_be_its(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, said: str
) -> None:
    """With ``IMAGEGEN_S3_REGION`` / ``IMAGEGEN_S3_ENDPOINT_URL`` unset, botocore reads its own
    (botocore/configprovider.py): the refusal names where it read it, not the unset setting,
    and never quotes the value."""
    secret = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv(variable, value.format(secret=secret))

    with pytest.raises(ConfigurationError) as error:
        S3Storage("bucket")

    setting = "IMAGEGEN_S3_REGION" if field == "aws_region" else "IMAGEGEN_S3_ENDPOINT_URL"
    assert error.value.fields == [field]
    assert said in error.value.message
    assert error.value.message.endswith(f"correct it, or set {setting}")
    assert "invalid IMAGEGEN_" not in error.value.message
    assert secret not in "".join(traceback.format_exception(error.value))
    assert "example" not in str(error.value.to_dict())


def test_a_region_or_endpoint_from_the_aws_config_file_is_said_to_be_its(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The AWS config file's ``region`` and ``endpoint_url`` are botocore's too."""
    from imagegen.storage import _s3_client

    for setting, field in (
        ("region = eu west 1", "aws_region"),
        ("endpoint_url = http://store example:9000", "aws_endpoint_url"),
    ):
        config = tmp_path / f"{field}.ini"
        config.write_text(f"[default]\n{setting}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
        monkeypatch.setattr(_s3_client, "_session", None)  # the session reads the file once

        with pytest.raises(ConfigurationError) as error:
            S3Storage("bucket")

        assert error.value.fields == [field]
        assert "the AWS config file" in error.value.message


@pytest.mark.parametrize(
    ("variable", "value", "refusal"),
    [
        ("AWS_PROFILE", "no-such-profile", "ProfileNotFound"),
        ("AWS_REQUEST_CHECKSUM_CALCULATION", "bogus", "InvalidChecksumConfigError"),
        ("AWS_DEFAULTS_MODE", "bogus", "InvalidDefaultsMode"),
    ],
)
def test_the_rest_of_the_aws_configuration_botocore_refuses_is_named_as_its(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, refusal: str
) -> None:
    """A profile botocore cannot find, a mode it does not know: a configuration error that
    says where botocore read it and what it refused, never an internal error, nor the value."""
    from imagegen.storage import _s3_client

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv(variable, value)
    monkeypatch.setattr(_s3_client, "_session", None)  # a session reads its profile once

    with pytest.raises(ConfigurationError) as error:
        S3Storage("bucket")

    assert error.value.fields == ["aws_config"]
    assert "AWS_PROFILE, other AWS_* variables or the AWS config file" in error.value.message
    assert f"({refusal})" in error.value.message
    assert value not in str(error.value.to_dict())


async def test_access_denied_says_so(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3()

    with s3.outage(status=403), pytest.raises(DependencyUnavailable) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")

    assert "denied" in error.value.message
    assert "credentials" in error.value.message


async def test_credentials_that_may_not_list_the_bucket_are_told_so(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """imagegen reads keys that may not exist yet (a redelivery's image, the prompt memo): S3
    answers those 403 to credentials without s3:ListBucket, so the check asks for it."""
    storage = make_s3()
    s3.denied = "listing"
    with pytest.raises(DependencyUnavailable) as error:
        await storage.head(KEYS.image)
    assert "s3:ListBucket" in error.value.message
    with pytest.raises(DependencyUnavailable) as error:
        await storage.check()
    assert error.value.message == (
        f"S3 bucket {storage.bucket!r} may not be listed with these credentials (AccessDenied):"
        " imagegen needs s3:ListBucket on it, besides s3:GetObject and s3:PutObject on its keys"
        " (docs/storage.md#permissions)"
    )
    # HeadBucket's 403 said nothing more; a GET of a key never written told which.
    assert [(r.method, r.path.split("?")[0]) for r in s3.requests[-2:]] == [
        ("HEAD", f"/{storage.bucket}"),
        ("GET", f"/{storage.bucket}/imagegen-check/absent"),
    ]
    s3.up()
    await storage.check()


async def test_rejected_credentials_are_told_apart_from_a_missing_permission(
    s3: S3Server, make_s3: MakeS3
) -> None:
    storage = make_s3()
    s3.denied = "credentials"
    with pytest.raises(DependencyUnavailable) as error:
        await storage.check()
    assert error.value.message == (
        f"S3 refused the credentials for bucket {storage.bucket!r} (InvalidAccessKeyId):"
        " check IMAGEGEN_S3_ACCESS_KEY_ID and IMAGEGEN_S3_SECRET_ACCESS_KEY"
    )
    assert error.value.retryable


async def test_credentials_for_objects_only_pass_the_check(
    s3: S3Server, bucket: str, make_s3: MakeS3
) -> None:
    """GCS's HEAD of a bucket wants storage.buckets.get, which its object roles lack
    (cloud.google.com/storage/docs/access-control/iam-xml): HeadBucket is refused, yet a
    missing key reads as missing, which is all imagegen asks of the bucket."""
    storage = make_s3("gcs")
    s3.down(status=403, count=1)

    await storage.check()

    assert [(r.method, r.path.split("?")[0]) for r in s3.requests] == [
        ("HEAD", f"/{bucket}"),
        ("GET", f"/{bucket}/imagegen-check/absent"),
        ("PUT", f"/{bucket}/{PROBE_KEY}"),  # conditional writes: created, then refused
        ("PUT", f"/{bucket}/{PROBE_KEY}"),
    ]


@pytest.mark.parametrize(
    ("attempt", "said"),
    [
        # HeadBucket's 401 has no body; the probe's GET says what was refused.
        (lambda s: s.check(), "(Unauthorized): check IMAGEGEN_S3_ACCESS_KEY_ID"),
        (
            lambda s: s.put(KEYS.image, PNG, content_type="image/png"),
            "denied (Unauthorized) during PutObject",
        ),
        (
            lambda s: s.create(KEYS.image, PNG, content_type="image/png"),
            "denied (Unauthorized) during PutObject",
        ),
        (lambda s: s.get(KEYS.image), "denied (Unauthorized) during GetObject"),
        (lambda s: s.head(KEYS.image), "denied (401) during HeadObject"),
    ],
    ids=["check", "put", "create", "get", "head"],
)
async def test_unauthorized_is_refused_credentials(
    s3: S3Server,
    make_s3: MakeS3,
    attempt: Callable[[S3Storage], Awaitable[object]],
    said: str,
) -> None:
    """R2 answers credentials it does not know 401 Unauthorized where S3 answers 403
    (developers.cloudflare.com/r2/api/error-codes/): the same error, naming the credentials."""
    storage = make_s3("r2")
    refused: dict[int, DependencyUnavailable] = {}
    for status, code in ((401, "Unauthorized"), (403, "InvalidAccessKeyId")):
        with s3.outage(status=status, code=code), pytest.raises(DependencyUnavailable) as error:
            await attempt(storage)
        refused[status] = error.value

    unauthorized, forbidden = refused[401], refused[403]
    assert type(unauthorized) is type(forbidden)
    assert (unauthorized.status, unauthorized.retryable) == (forbidden.status, True)
    assert said in unauthorized.message
    assert "credentials" in unauthorized.message


@pytest.mark.parametrize(
    ("status", "code", "said"),
    [
        # ErrorResponses.html: "A conflicting conditional operation is currently in progress
        # against this resource. Try again."
        (409, "OperationAborted", "unavailable"),
        # A region MinIO, R2 or GCS will not sign for: botocore redirects only on AWS.
        (400, "AuthorizationHeaderMalformed", "region"),
        # A conditional write's answer to a write that set no condition: the store's doing.
        (412, "PreconditionFailed", "precondition"),
    ],
)
async def test_what_the_store_or_its_settings_cause_is_retryable(
    s3: S3Server, make_s3: MakeS3, status: int, code: str, said: str
) -> None:
    """Never a 500 ("a bug") for what the event did not cause: a 503 with Retry-After,
    redelivered once the store, or its settings, are right."""
    storage = make_s3()
    with s3.outage(status=status, code=code), pytest.raises(DependencyUnavailable) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")
    assert error.value.retryable and said in error.value.message


async def test_a_bucket_name_the_store_refuses_is_a_configuration_error(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """ErrorResponses.html: InvalidBucketName, 400, for a name the store's rules refuse (a
    store whose rules go beyond its preset's). It was answered as a bug: a 500, never retried."""
    storage = make_s3()
    with (
        s3.outage(status=400, code="InvalidBucketName"),
        pytest.raises(ConfigurationError) as error,
    ):
        await storage.put(KEYS.image, PNG, content_type="image/png")
    assert error.value.retryable and error.value.status == 503
    assert error.value.fields == ["storage_url"]
    assert "InvalidBucketName" in error.value.message


@pytest.mark.parametrize(
    ("status", "code"), [(409, "OperationAborted"), (400, "AuthorizationHeaderMalformed")]
)
async def test_a_head_refused_without_a_reason_is_retryable(
    s3: S3Server, make_s3: MakeS3, status: int, code: str
) -> None:
    """A HEAD's answer has no body: botocore gives the status as the code, and the store's
    reason (a conflict in flight, a region it will not sign for) is not there to tell."""
    storage = make_s3()
    with s3.outage(status=status, code=code), pytest.raises(DependencyUnavailable) as error:
        await storage.head(KEYS.image)
    assert error.value.retryable and f"({status}; a HEAD says no more)" in error.value.message


async def test_the_checks_head_of_the_bucket_refused_without_a_reason_says_the_region(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """MinIO and R2 answer a region they will not sign for 400 AuthorizationHeaderMalformed,
    which HeadBucket's answer, bodiless, cannot carry: it was answered as a bug (a 500)."""
    storage = make_s3()
    with (
        s3.outage(status=400, code="AuthorizationHeaderMalformed"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await storage.check()

    assert type(error.value) is DependencyUnavailable and error.value.retryable
    assert error.value.message == (
        f"S3 HeadBucket on bucket {storage.bucket!r} refused (400; a HEAD says no more): retry,"
        " and check the region, the endpoint and the clock (docs/storage.md)"
    )
    assert [r.method for r in s3.requests] == ["HEAD"]


async def test_a_store_without_conditional_writes_is_a_configuration_error(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """ErrorResponses.html: NotImplemented (501), "a header you provided implies
    functionality that is not implemented": AWS before August 2024, some S3 gateways. Retrying
    would never help; the store, or the preset, has to change."""
    storage = make_s3(max_attempts=3)

    with (
        s3.outage(status=501, code="NotImplemented"),
        pytest.raises(ConfigurationError) as error,
    ):
        await storage.create(KEYS.image, PNG, content_type="image/png")

    assert error.value.retryable and error.value.status == 503
    assert error.value.fields == ["s3_preset"]
    message = error.value.message
    assert "does not support conditional writes" in message
    assert "If-None-Match: *" in message and "NotImplemented" in message
    assert "IMAGEGEN_S3_PRESET" in message
    # Asked once: no retry of botocore's, and the check stopped at its first create.
    assert [(r.method, probe(r)) for r in s3.requests] == [("PUT", True)]
    assert await storage.create(KEYS.image, PNG, content_type="image/png")  # not remembered


async def test_not_implemented_on_a_gcs_preset_says_the_endpoint_is_not_gcs(
    s3: S3Server, make_s3: MakeS3
) -> None:
    with (
        s3.outage(status=501, code="NotImplemented"),
        pytest.raises(ConfigurationError) as error,
    ):
        await make_s3("gcs").create(KEYS.image, PNG, content_type="image/png")

    message = error.value.message
    assert "x-goog-if-generation-match: 0" in message
    assert "does not behave as Google Cloud Storage" in message
    assert "set IMAGEGEN_S3_PRESET=gcs" not in message


async def test_not_implemented_without_a_condition_stays_retryable(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """A plain upload asks for nothing a store may lack: a 501 there is the store's trouble."""
    storage = make_s3()
    with (
        s3.outage(status=501, code="NotImplemented"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await storage.put(KEYS.image, PNG, content_type="image/png")
    assert type(error.value) is DependencyUnavailable and "NotImplemented" in error.value.message


async def test_other_client_errors_are_not_retryable(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3()

    with s3.outage(status=400), pytest.raises(InternalError) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")

    assert not error.value.retryable


async def test_no_credential_in_errors(s3: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3(
        access_key_id=SecretStr(KEY_ID),
        secret_access_key=SecretStr(SECRET),
    )
    missing = make_s3(
        bucket_name="no-such-bucket-here",
        access_key_id=SecretStr(KEY_ID),
        secret_access_key=SecretStr(SECRET),
    )
    # A hang ends at the read timeout: a short one, as nothing is answered at all.
    impatient = make_s3(
        access_key_id=SecretStr(KEY_ID),
        secret_access_key=SecretStr(SECRET),
        read_timeout=0.5,
    )
    errors: list[ImageGenError] = []
    for client, kwargs in (
        (storage, {}),
        (storage, {"status": 503}),
        (storage, {"status": 403}),
        (impatient, {"hang": True}),
    ):
        with s3.outage(**kwargs), pytest.raises(DependencyUnavailable) as error:
            await client.put(KEYS.image, PNG, content_type="image/png")
        errors.append(error.value)
    with pytest.raises(DependencyUnavailable) as error:
        await missing.put(KEYS.image, PNG, content_type="image/png")
    errors.append(error.value)

    texts = [repr(storage), repr(storage.options), repr(impatient)]
    for err in errors:
        texts += [str(err), repr(err), str(err.to_dict()), str(err.__cause__)]
    for text in texts:
        assert SECRET not in text
        assert KEY_ID not in text


async def test_no_credentials_at_all(s3: S3Server, bucket: str) -> None:
    from imagegen.storage import s3_options
    from tests.storage.conftest import fast_options

    storage = S3Storage(bucket, options=fast_options(s3_options(endpoint_url=s3.endpoint)))
    with pytest.raises(DependencyUnavailable) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")
    assert "credentials" in error.value.message
    assert s3.requests == []


class _BrokenBody(threading.Thread):
    """One-request-per-connection HTTP server on loopback whose GETs start a 200 answer of
    ``len(PNG)`` bytes and break it as ``how`` says: ``"short"`` sends part of the body then
    closes, ``"reset"`` sends part then resets the connection, ``"checksum"`` sends it whole
    under a CRC32 of other bytes."""

    def __init__(self, how: str) -> None:
        super().__init__(daemon=True)
        self.how = how
        self.listener = socket.socket()
        for port in range(50900, 51000):
            try:
                self.listener.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        self.listener.listen()
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        break
                    request += data
                crc = base64.b64encode(zlib.crc32(b"other").to_bytes(4, "big")).decode()
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(PNG)}\r\n"
                if self.how == "checksum":
                    head += f"x-amz-checksum-crc32: {crc}\r\n"
                conn.sendall(f"{head}Connection: close\r\n\r\n".encode())
                if self.how == "checksum":
                    conn.sendall(PNG)
                    continue
                conn.sendall(PNG[:100])
                if self.how == "reset":  # SO_LINGER of 0: close() sends an RST
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def stop(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("how", ["short", "reset", "checksum"])
async def test_a_body_cut_short_or_damaged_is_retryable(how: str) -> None:
    """A body read through the raw stream (the ``with`` of botocore's StreamingBody gives it,
    botocore/response.py) escaped botocore's errors: a reset was a 500, a short body was
    not told apart from a whole one, and a wrong checksum went unchecked."""
    server = _BrokenBody(how)
    server.start()
    options = s3_options(
        "aws",
        endpoint_url=server.endpoint,
        access_key_id=SecretStr(ACCESS_KEY_ID),
        secret_access_key=SecretStr(SECRET_ACCESS_KEY),
    )
    storage = S3Storage("any-bucket", "", fast_options(options))
    try:
        with pytest.raises(DependencyUnavailable) as error:
            await storage.get(KEYS.image)
    finally:
        server.stop()

    assert error.value.retryable
    assert error.value.status == 503
    assert "GetObject" in error.value.message


async def test_botocore_stops_retrying_once_its_retry_quota_is_spent(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """botocore's standard retry mode spends a quota of 500 per client, 14 for each retry of a
    5xx, a timeout or a connection error (botocore/retries/standard.py, RetryQuotaChecker;
    quota.py): docs/storage.md's outage timings hold while it lasts."""
    storage = make_s3(max_attempts=3)

    tries = []
    with s3.outage(status=500):
        for _ in range(20):
            before = len(s3.requests)
            with pytest.raises(DependencyUnavailable):
                await storage.get(KEYS.image)
            tries.append(len(s3.requests) - before)

    assert tries == [3] * 17 + [2] + [1] * 2  # 17 calls of 28 each, then 14 of the 24 left


# 5. Threads


def test_a_stalled_store_leaves_the_default_executor_to_the_rest(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """S3 calls run on threads of their own: calls held by a store that does not answer (each
    for a read timeout per attempt) once took every thread of the event loop's default
    executor, which persist's check of a PNG and derive's encoding wait for."""
    storage = make_s3(read_timeout=3.0)

    async def main() -> tuple[float, list[BaseException | bytes]]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        with s3.outage(hang=True):
            reads = [asyncio.ensure_future(storage.get(KEYS.image)) for _ in range(4)]
            while len(s3.requests) < 4:  # each holds its thread, waiting on the store
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.to_thread(lambda: None)  # another stage's blocking work
            waited = time.monotonic() - started
            return waited, await asyncio.gather(*reads, return_exceptions=True)

    waited, reads = asyncio.run(main())

    assert waited < 1.0
    assert all(isinstance(read, DependencyUnavailable) for read in reads)


async def test_calls_past_every_thread_held_fail_retryably(
    s3: S3Server, make_s3: MakeS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call waits for a thread while others end; once none has ended for THREAD_WAIT (every
    thread held by a store that does not answer), it fails with a retryable 503."""
    from imagegen.storage import s3 as s3_module

    monkeypatch.setattr(s3_module, "_POOL", DaemonPool("s3-test", max_threads=1, queue_for=0.2))
    storage = make_s3(read_timeout=3.0)

    with s3.outage(hang=True):
        held = asyncio.ensure_future(storage.get(KEYS.image))
        while not s3.requests:  # it holds the one thread, waiting on the store
            await asyncio.sleep(0.01)
        with pytest.raises(DependencyUnavailable) as error:
            await storage.head(KEYS.image)
        held.cancel()

    assert error.value.retryable
    assert "no s3-test thread was free for 0.2s" in error.value.message
    assert storage.bucket in error.value.message
    assert len(s3.requests) == 1  # the waiting call never reached the store


def test_a_forked_child_has_threads_of_its_own(s3: S3Server, make_s3: MakeS3) -> None:
    """A process forked after S3 calls (gunicorn's workers, from a parent that loaded the app)
    has none of its parent's threads: its calls run on a pool of its own. On the parent's, they
    wait for good on threads the pool counts idle but the child lacks."""
    storage = make_s3()
    asyncio.run(storage.put(KEYS.image, PNG, content_type="image/png"))  # a thread left idle

    def child_reads() -> bytes:
        try:
            got = asyncio.run(asyncio.wait_for(storage.get(KEYS.image), 5))
        except BaseException as exc:  # anything the child meets goes back to the parent
            return repr(exc).encode()
        return b"ok" if got == PNG else b"other bytes"

    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12+ warns of fork() beside threads (the server's)
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child never returns into pytest: no teardown, no flushing the parent's
        try:
            os.close(read)
            os.write(write, child_reads())
        finally:
            os._exit(0)
    os.close(write)
    try:
        answered, _, _ = select.select([read], [], [], 10)
        said = os.read(read, 200) if answered else b"no answer in 10s"
    finally:
        os.close(read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    assert said == b"ok"


def test_botocore_takes_its_region_from_aws_default_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under a preset without a region (``aws``), botocore reads ``AWS_DEFAULT_REGION``;
    ``AWS_REGION`` is not its setting (botocore/configprovider.py)."""
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert S3Storage("bucket")._client.meta.region_name == "us-east-1"

    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert S3Storage("bucket")._client.meta.region_name == "ap-south-1"


# 6. Tracing


def test_botocore_is_instrumented_once(make_s3: MakeS3) -> None:
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor

    make_s3()
    make_s3()
    _instrument_botocore()

    assert BotocoreInstrumentor().is_instrumented_by_opentelemetry  # type: ignore[no-untyped-call]
