"""What S3's error codes become, told by the code before the status: moto behind the recording
proxy of tests/fakes/s3_server.py, which answers the status and code of AWS's "List of error
codes" (docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html) that moto never gives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest
from botocore.exceptions import ClientError

from imagegen.errors import ConfigurationError, DependencyUnavailable, InternalError
from imagegen.storage import GenerationKeys, S3Storage
from tests.fakes.s3_server import S3Server
from tests.storage.conftest import MakeS3

KEYS = GenerationKeys("gen-0004", datetime(2026, 5, 1, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1024
CLOCK = "check the region, the endpoint and the clock"


@pytest.mark.parametrize(
    "attempt",
    [
        lambda s: s.put(KEYS.image, PNG, content_type="image/png"),
        lambda s: s.create(KEYS.image, PNG, content_type="image/png"),
        lambda s: s.get(KEYS.image),
    ],
    ids=["put", "create", "get"],
)
async def test_a_clock_minutes_off_is_said_so_not_refused_credentials(
    s3: S3Server, make_s3: MakeS3, attempt: Callable[[S3Storage], Awaitable[object]]
) -> None:
    """ErrorResponses.html: RequestTimeTooSkewed, 403 Forbidden. Its status is a refusal's;
    its code says the clock."""
    storage = make_s3()
    with (
        s3.outage(status=403, code="RequestTimeTooSkewed"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await attempt(storage)

    assert error.value.retryable and error.value.status == 503
    assert f"(RequestTimeTooSkewed): {CLOCK}" in error.value.message
    assert "credentials" not in error.value.message


async def test_the_check_says_a_clock_minutes_off(s3: S3Server, make_s3: MakeS3) -> None:
    """HeadBucket's 403 has no body; the GET that follows it has, and says the clock."""
    storage = make_s3()
    with (
        s3.outage(status=403, code="RequestTimeTooSkewed"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await storage.check()

    assert error.value.message == (
        f"S3 GetObject on bucket {storage.bucket!r} refused (RequestTimeTooSkewed): {CLOCK}"
        " (docs/storage.md#errors-the-store-answers)"
    )
    assert [r.method for r in s3.requests] == ["HEAD", "GET"]
    await storage.check()


@pytest.mark.parametrize(
    ("code", "preset"),
    [
        # A body cut short or changed on the way, checked against what was sent: under
        # checksums when_required, only the Content-MD5 this code computes.
        ("IncompleteBody", "aws"),
        ("BadDigest", "minio"),
        ("XAmzContentSHA256Mismatch", "gcs"),
    ],
)
async def test_what_the_way_to_the_store_causes_is_retryable(
    s3: S3Server, make_s3: MakeS3, code: str, preset: str
) -> None:
    """Each a 400 in ErrorResponses.html, none the event's doing: a 503 with Retry-After,
    never a 500 ("a bug"); the next delivery stores the object."""
    storage = make_s3(preset)
    with s3.outage(status=400, code=code), pytest.raises(DependencyUnavailable) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png")

    assert type(error.value) is DependencyUnavailable
    assert error.value.status == 503 and error.value.retry_after
    assert f"unavailable during PutObject ({code})" in error.value.message
    await storage.put(KEYS.image, PNG, content_type="image/png")
    assert await storage.get(KEYS.image) == PNG


@pytest.mark.parametrize("code", ["BadDigest", "XAmzContentSHA256Mismatch"])
async def test_a_checksum_refused_under_the_aws_preset_elsewhere_names_the_preset(
    s3: S3Server, make_s3: MakeS3, code: str
) -> None:
    """boto3 adds a CRC32 checksum to uploads under its defaults, which stores other than AWS
    refuse on every upload (scality/cloudserver#5784: BadDigest; boto/boto3#4400, #4497:
    XAmzContentSHA256Mismatch): the preset to change, not a delivery to retry as it is."""
    storage = make_s3("aws")
    for attempt in (storage.put, storage.create):
        with s3.outage(status=400, code=code), pytest.raises(ConfigurationError) as error:
            await attempt(KEYS.image, PNG, content_type="image/png")

        assert error.value.fields == ["s3_preset"]
        assert f"refused the upload's checksum ({code})" in error.value.message
        assert "set IMAGEGEN_S3_PRESET=minio" in error.value.message


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("aws", {"endpoint_url": "https://s3.us-east-1.amazonaws.com"}),  # AWS's own
        ("aws", {"endpoint_url": "https://S3.eu-west-1.AmazonAWS.com.:443"}),  # spelt otherwise
        ("aws", {"checksums": "when_required"}),  # no checksum of boto3's own sent
    ],
)
def test_a_checksum_refused_where_boto3_adds_none_of_its_own_is_transient(
    make_s3: MakeS3, preset: str, overrides: dict[str, str]
) -> None:
    """From AWS itself, or with only the Content-MD5 this code computes, a refused checksum is
    a body changed on the way: retried as it is, with no advice to change the preset."""
    storage = make_s3(preset, **overrides)
    error = storage._client_error("PutObject", _client_error_of("BadDigest", 400))
    assert type(error) is DependencyUnavailable and error.retryable


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        # Backblaze B2 (matrix-org/synapse-s3-storage-provider#128, vatesfr/xen-orchestra#8358)
        (400, "InvalidArgument", "Unsupported header 'x-amz-sdk-checksum-algorithm' received"),
        (400, "InvalidArgument", "Unsupported header 'x-amz-checksum-mode' received"),
        # R2, January 2025 (cloudflare/cloudflare-docs#19236)
        (
            501,
            "NotImplemented",
            "Header 'x-amz-checksum-crc32' with value 'jt9Hdw==' not implemented",
        ),
        # The aws-chunked upload with a trailer, as a store may name it
        (400, "InvalidRequest", "x-amz-trailer is not supported"),
        (401, "Unauthorized", "STREAMING-UNSIGNED-PAYLOAD-TRAILER is not supported"),
    ],
)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_a_refusal_naming_a_checksum_header_names_the_preset(
    make_s3: MakeS3, status: int, code: str, message: str, conditional: bool
) -> None:
    """Told before a 501's "no conditional writes", a 401's "credentials" and a 400's "a bug"."""
    storage = make_s3("aws")
    error = storage._client_error(
        "PutObject", _client_error_of(code, status, message), conditional=conditional
    )
    assert isinstance(error, ConfigurationError) and error.fields == ["s3_preset"]
    assert f"refused the upload's checksum ({code})" in error.message


@pytest.mark.parametrize(
    ("preset", "overrides", "status", "message", "expected"),
    [
        # boto3 adds no checksum header of its own: not the preset's doing.
        ("minio", {}, 400, "Unsupported header 'x-amz-checksum-crc32'", InternalError),
        (
            "aws",
            {"endpoint_url": "https://s3.us-east-1.amazonaws.com"},
            400,
            "x-amz-trailer",
            InternalError,
        ),
        # No checksum header named: what it was before.
        ("aws", {}, 400, "Unsupported header 'x-amz-acl' received", InternalError),
        (
            "aws",
            {},
            501,
            "Header 'If-None-Match' with value '*' not implemented",
            ConfigurationError,
        ),
        # A status no such refusal has.
        ("aws", {}, 503, "x-amz-checksum-crc32 service unavailable", DependencyUnavailable),
    ],
)
def test_only_a_refusal_of_boto3s_own_checksum_header_names_it(
    make_s3: MakeS3,
    preset: str,
    overrides: dict[str, str],
    status: int,
    message: str,
    expected: type[Exception],
) -> None:
    storage = make_s3(preset, **overrides)
    code = {400: "InvalidArgument", 501: "NotImplemented", 503: "ServiceUnavailable"}[status]
    error = storage._client_error(
        "PutObject", _client_error_of(code, status, message), conditional=True
    )
    assert type(error) is expected
    assert "checksum" not in str(error)


def _client_error_of(code: str, status: int, message: str | None = None) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message or code},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


async def test_a_session_token_to_refresh_is_a_refusal_of_the_credentials(
    s3: S3Server, make_s3: MakeS3
) -> None:
    """ErrorResponses.html: TokenRefreshRequired, 400. botocore does not refresh credentials
    given in the environment, so every attempt meets it again, as it meets ExpiredToken."""
    storage = make_s3()
    with (
        s3.outage(status=400, code="TokenRefreshRequired"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await storage.put(KEYS.image, PNG, content_type="image/png")

    assert error.value.retryable and error.value.status == 503
    assert "denied (TokenRefreshRequired) during PutObject: check the credentials" in (
        error.value.message
    )


@pytest.mark.parametrize(
    ("preset", "said"),
    [
        ("aws", "for MinIO, set IMAGEGEN_S3_PRESET=minio"),
        ("minio", "uploads under IMAGEGEN_S3_PRESET=minio carry one"),
    ],
)
async def test_an_upload_refused_for_want_of_a_length_names_the_preset(
    s3: S3Server, make_s3: MakeS3, preset: str, said: str
) -> None:
    """ErrorResponses.html: MissingContentLength, 411. MinIO before RELEASE.2023-05-18T00-05-36Z
    answers it to the aws-chunked uploads of the ``aws`` preset (minio/minio#16484)."""
    storage = make_s3(preset)
    for attempt in (storage.put, storage.create):
        with (
            s3.outage(status=411, code="MissingContentLength"),
            pytest.raises(ConfigurationError) as error,
        ):
            await attempt(KEYS.image, PNG, content_type="image/png")

        assert error.value.retryable and error.value.status == 503
        assert error.value.fields == ["s3_preset"]
        assert "without a Content-Length (MissingContentLength)" in error.value.message
        assert said in error.value.message


async def test_an_archived_object_is_said_so(s3: S3Server, make_s3: MakeS3) -> None:
    """ErrorResponses.html: InvalidObjectState, 403, "the operation is not valid for the
    current state of the object": a GET of an object a lifecycle rule archived."""
    storage = make_s3()
    await storage.put(KEYS.image, PNG, content_type="image/png")
    with (
        s3.outage(status=403, code="InvalidObjectState"),
        pytest.raises(DependencyUnavailable) as error,
    ):
        await storage.get(KEYS.image)

    assert type(error.value) is DependencyUnavailable and error.value.retryable
    assert "refused (InvalidObjectState): the object is archived" in error.value.message
    assert "credentials" not in error.value.message
