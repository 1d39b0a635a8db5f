"""open_storage: from storage_url and the s3_* settings to a configured backend."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.credentials import Credentials
from packaging.requirements import Requirement

from imagegen.errors import ConfigurationError
from imagegen.settings import Settings
from imagegen.storage import LocalStorage, S3Storage, Storage, open_storage

R2_ENDPOINT = "https://0123abcd.r2.cloudflarestorage.com"


@pytest.fixture
def opened() -> list[Storage]:
    return []


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def open_s3(opened: list[Storage], **values: Any) -> S3Storage:
    storage = open_storage(settings(**values))
    opened.append(storage)
    assert isinstance(storage, S3Storage)
    return storage


def signed_request(storage: S3Storage) -> AWSPreparedRequest:
    """The request a HEAD of ``storage`` sends, caught by botocore's ``before-send`` event."""
    sent: list[AWSPreparedRequest] = []

    def answer(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        sent.append(request)  # answered here: nothing leaves the machine
        return AWSResponse(request.url, 404, {}, _Empty())

    storage._client.meta.events.register_first("before-send.s3", answer)
    asyncio.run(storage.head("probe.png"))
    return sent[0]


def header(request: AWSPreparedRequest, name: str) -> str:
    value = request.headers[name]
    return value.decode() if isinstance(value, bytes) else str(value)


class _Empty:
    def stream(self, **_: Any) -> Iterator[bytes]:
        return iter([b""])


def sigv4_signature(request: AWSPreparedRequest, key_id: str, secret: str, *, region: str) -> str:
    """The ``Signature=...`` SigV4 gives ``request`` under this key (botocore's own signer)."""
    # Only what was signed: botocore adds its own headers (amz-sdk-*) after signing.
    signed = header(request, "Authorization").split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = {k: header(request, k) for k in request.headers if k.lower() in signed}
    again = AWSRequest(method=request.method, url=request.url, headers=headers, data=request.body)
    again.context["timestamp"] = header(request, "X-Amz-Date")
    auth = S3SigV4Auth(Credentials(key_id, secret), "s3", region)
    signature = auth.signature(auth.string_to_sign(again, auth.canonical_request(again)), again)
    return f"Signature={signature}"


def client_config(storage: S3Storage) -> dict[str, Any]:
    meta = storage._client.meta
    return {
        "endpoint": meta.endpoint_url,
        "region": meta.region_name,
        "addressing": meta.config.s3["addressing_style"],
        "checksums": (
            meta.config.request_checksum_calculation,
            meta.config.response_checksum_validation,
        ),
    }


# 1. Local


def test_default_is_local_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage(settings())
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path.resolve() / "output"


@pytest.mark.parametrize("form", ["{path}", "file://{path}", "file://localhost{path}"])
def test_local_forms(tmp_path: Path, form: str) -> None:
    storage = open_storage(settings(storage_url=form.format(path=tmp_path / "out dir")))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path.resolve() / "out dir"


def test_file_url_is_unquoted(tmp_path: Path) -> None:
    storage = open_storage(settings(storage_url=(tmp_path / "out dir").as_uri()))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path.resolve() / "out dir"


# 2. S3 and its presets


def test_s3_aws_defaults(opened: list[Storage]) -> None:
    storage = open_s3(opened, storage_url="s3://my-bucket/images", s3_region="eu-west-1")

    assert (storage.bucket, storage.prefix, storage.options.preset) == (
        "my-bucket",
        "images",
        "aws",
    )
    assert client_config(storage) == {
        "endpoint": "https://s3.eu-west-1.amazonaws.com",
        "region": "eu-west-1",
        "addressing": "auto",
        "checksums": ("when_supported", "when_supported"),
    }
    assert storage.location("a.png") == "s3://my-bucket/images/a.png"


def test_s3_gcs(opened: list[Storage]) -> None:
    storage = open_s3(
        opened,
        storage_url="s3://my-bucket",
        s3_preset="gcs",
        s3_access_key_id="GOOG1EXAMPLE",
        s3_secret_access_key="hmac-secret",
    )

    assert storage.prefix == ""
    assert client_config(storage) == {
        "endpoint": "https://storage.googleapis.com",
        "region": "auto",
        "addressing": "path",
        "checksums": ("when_required", "when_required"),
    }
    # Requests are signed with the HMAC key given: the signature checks out with its secret.
    request = signed_request(storage)
    authorization = header(request, "Authorization")
    assert "Credential=GOOG1EXAMPLE/" in authorization
    assert sigv4_signature(request, "GOOG1EXAMPLE", "hmac-secret", region="auto") in authorization


def test_s3_r2(opened: list[Storage]) -> None:
    storage = open_s3(opened, storage_url="s3://b2b/x", s3_preset="r2", s3_endpoint_url=R2_ENDPOINT)
    assert client_config(storage) == {
        "endpoint": R2_ENDPOINT,
        "region": "auto",
        "addressing": "path",
        "checksums": ("when_required", "when_required"),
    }


def test_s3_minio(opened: list[Storage]) -> None:
    storage = open_s3(
        opened, storage_url="s3://imgs", s3_preset="minio", s3_endpoint_url="http://minio:9000"
    )
    # MinIO before RELEASE.2023-05-18T00-05-36Z answers botocore's default upload over HTTPS
    # (aws-chunked, no Content-Length) 411 MissingContentLength (minio/minio#16484).
    assert client_config(storage) == {
        "endpoint": "http://minio:9000",
        "region": "us-east-1",
        "addressing": "path",
        "checksums": ("when_required", "when_required"),
    }


def test_the_boto3_floor_has_the_checksum_settings() -> None:
    """The gcs, r2 and minio presets set request_checksum_calculation, which botocore has from
    1.36.0 (boto3 1.36 requires it): under a lower floor the client of those presets would
    not be made (botocore 1.35's Config refuses the argument)."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    requirements = [Requirement(line) for line in project["project"]["dependencies"]]
    (boto3,) = [r for r in requirements if r.name == "boto3"]
    assert "1.35.99" not in boto3.specifier
    assert version("boto3") in boto3.specifier


def test_explicit_settings_override_the_preset(opened: list[Storage]) -> None:
    storage = open_s3(
        opened,
        storage_url="s3://my-bucket",
        s3_preset="gcs",
        s3_endpoint_url="https://storage.example.com",
        s3_region="europe-west4",
        s3_addressing_style="virtual",
    )
    config = client_config(storage)
    assert (config["endpoint"], config["region"], config["addressing"]) == (
        "https://storage.example.com",
        "europe-west4",
        "virtual",
    )
    assert config["checksums"] == ("when_required", "when_required")


@pytest.mark.parametrize("preset", ["r2", "minio"])
def test_preset_without_its_endpoint(preset: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url="s3://bucket", s3_preset=preset))
    assert error.value.fields == ["s3_endpoint_url"]
    assert "IMAGEGEN_S3_ENDPOINT_URL" in error.value.message


@pytest.mark.parametrize(
    ("values", "wanted", "ignored"),
    [
        # https://cloud.google.com/storage/docs/request-preconditions: GCS applies
        # If-None-Match to reads only, so every writer of a key would win, silently.
        ({"s3_endpoint_url": "https://storage.googleapis.com"}, "gcs", "If-None-Match: *"),
        (
            {"s3_preset": "minio", "s3_endpoint_url": "https://Storage.GoogleAPIs.com.:443"},
            "gcs",
            "If-None-Match: *",
        ),
        (
            {"s3_preset": "r2", "s3_endpoint_url": "https://my-bucket.storage.googleapis.com"},
            "gcs",
            "If-None-Match: *",
        ),
        # Any googleapis.com host: a Private Service Connect endpoint
        # (https://cloud.google.com/vpc/docs/about-accessing-google-apis-endpoints), a regional
        # one (https://cloud.google.com/storage/docs/regional-endpoints).
        (
            {"s3_preset": "minio", "s3_endpoint_url": "https://storage-myep.p.googleapis.com"},
            "gcs",
            "If-None-Match: *",
        ),
        ({"s3_endpoint_url": "https://storage-myep.p.googleapis.com"}, "gcs", "If-None-Match: *"),
        (
            {"s3_endpoint_url": "https://storage.europe-west3.rep.googleapis.com"},
            "gcs",
            "If-None-Match: *",
        ),
        # GCS's precondition header is not R2's.
        ({"s3_preset": "gcs", "s3_endpoint_url": R2_ENDPOINT}, "r2", "x-goog-if-generation-match"),
        # R2 honours If-None-Match; the r2 preset is still the one its settings come from.
        ({"s3_endpoint_url": R2_ENDPOINT}, "r2", None),
        (
            {
                "s3_preset": "minio",
                "s3_endpoint_url": "https://0123abcd.eu.r2.cloudflarestorage.com",
            },
            "r2",
            None,
        ),
    ],
)
def test_a_providers_endpoint_needs_its_preset(
    values: dict[str, str], wanted: str, ignored: str | None
) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url="s3://bucket", **values))
    assert error.value.fields == ["s3_preset"]
    assert f": set IMAGEGEN_S3_PRESET={wanted}" in error.value.message
    if ignored is None:
        assert "both win" not in error.value.message
    else:
        assert ignored in error.value.message
        assert error.value.message.endswith("on uploads: two writers of a key would both win)")


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://storage.googleapis.com.example.net",
        "https://notgoogleapis.com",
        "https://r2.cloudflarestorage.com.example.net",
    ],
)
def test_hosts_that_only_look_like_a_providers_are_not_refused(
    opened: list[Storage], endpoint: str
) -> None:
    storage = open_s3(opened, storage_url="s3://bucket", s3_endpoint_url=endpoint)
    assert storage.options.endpoint_url == endpoint


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"s3_access_key_id": "AKIA0000"}, "s3_secret_access_key"),
        ({"s3_secret_access_key": "only-the-secret"}, "s3_access_key_id"),
    ],
)
def test_half_a_key_pair(values: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url="s3://bucket", **values))
    assert error.value.fields == [field]
    assert "only-the-secret" not in str(error.value.to_dict())


# 3. Invalid URLs


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "http://example.com/images",
        "gs://bucket",
        "s3://",
        "s3://UPPER",
        "s3://bucket/../etc",
        "s3://bucket/a//b",
        "s3://key:secret@bucket",
        "file://otherhost/tmp/x",
        "file:///tmp/x?y=1",
        # A URL short of its //: a directory named "s3:bucket" is not what was meant.
        "s3:bucket",
        "S3:bucket/prefix",
        "file:/tmp/x",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url=url))
    assert error.value.fields == ["storage_url"]


@pytest.mark.parametrize("url", ["s3://AKIA0000:hunter2@bucket", "https://AKIA0000:hunter2@host/b"])
def test_credentials_in_a_url_are_not_echoed(url: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url=url))
    assert "hunter2" not in str(error.value.to_dict())
    assert "AKIA0000" not in str(error.value.to_dict())


def test_gs_url_points_at_the_preset() -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url="gs://bucket"))
    assert "IMAGEGEN_S3_PRESET=gcs" in error.value.message  # as it is set


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host/x", "unsupported scheme 'ftp'; use a path, file:// or s3://"),
        ("s3://", "not a valid bucket name"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://bucket/../x", "the prefix must be a safe relative path"),
        ("s3://key:secret@bucket/x", "expected s3://bucket[/prefix]"),
    ],
)
def test_an_invalid_url_is_named_by_its_variable_never_shown(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url=url))
    assert error.value.message == f"invalid IMAGEGEN_STORAGE_URL: {why}"
    assert error.value.errors == [{"field": "storage_url", "message": why}]


# AWS S3 User Guide, "Bucket naming rules" (general purpose buckets): names S3 answers
# InvalidBucketName, which the union of S3's and GCS's character rules let through.
S3_REFUSES = [
    ("xn--bucket", "the prefix xn-- is reserved"),
    ("sthree-bucket", "the prefix sthree- is reserved"),
    ("amzn-s3-demo-bucket", "the prefix amzn-s3-demo- is reserved"),
    ("bucket-s3alias", "the suffix -s3alias is reserved"),
    ("bucket--ol-s3", "the suffix --ol-s3 is reserved"),
    ("bucket.mrap", "the suffix .mrap is reserved"),
    ("bucket--x-s3", "the suffix --x-s3 is reserved"),
    ("bucket--table-s3", "the suffix --table-s3 is reserved"),
    ("192.168.1.1", "formatted as an IP address"),
    ("bucket.-x", "a hyphen next to a dot"),
    ("bucket-.x", "a hyphen next to a dot"),
    ("b" * 64, "more than 63 characters"),
]


@pytest.mark.parametrize("preset", [None, "aws", "r2", "minio"])
@pytest.mark.parametrize(("bucket", "why"), S3_REFUSES, ids=[b[:20] for b, _ in S3_REFUSES])
def test_a_bucket_name_s3_refuses_is_refused_by_the_variable(
    preset: str | None, bucket: str, why: str
) -> None:
    """It was taken, and every write failed as a bug (a 500 that is never retried)."""
    endpoint = {"s3_endpoint_url": "http://127.0.0.1:50101"} if preset in ("r2", "minio") else {}
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url=f"s3://{bucket}/images", s3_preset=preset, **endpoint))
    said = f"not a valid S3 bucket name ({why})"
    assert error.value.message == f"invalid IMAGEGEN_STORAGE_URL: {said}"
    assert error.value.errors == [{"field": "storage_url", "message": said}]


@pytest.mark.parametrize("preset", ["r2", "minio"])
def test_an_underscore_is_refused_where_no_legacy_name_can_be(preset: str) -> None:
    endpoint = {"s3_endpoint_url": "http://127.0.0.1:50101"}
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url="s3://my_bucket/images", s3_preset=preset, **endpoint))
    said = "not a valid S3 bucket name (an underscore)"
    assert error.value.errors == [{"field": "storage_url", "message": said}]


@pytest.mark.parametrize("preset", [None, "aws"])
def test_an_aws_bucket_with_an_underscore_is_a_legacy_name_taken(
    opened: list[Storage], preset: str | None
) -> None:
    """Buckets made in us-east-1 before March 2018 could hold underscores; S3 still serves them
    (path-style). Refused, a deployment on one could not start."""
    storage = open_s3(opened, storage_url="s3://my_legacy_bucket/images", s3_preset=preset)
    assert storage.bucket == "my_legacy_bucket"


GCS = {"s3_preset": "gcs", "s3_access_key_id": "GOOG1EXAMPLE", "s3_secret_access_key": "x"}


@pytest.mark.parametrize(
    "bucket",
    [
        "my_bucket",
        "a" * 63 + "." + "b" * 63,
        ".".join(["c" * 63, "d" * 63, "e" * 63, "f" * 30]),  # 222 characters
    ],
)
def test_gcs_keeps_its_own_bucket_names(opened: list[Storage], bucket: str) -> None:
    """GCS takes underscores, and up to 222 characters with dots: refused under the other
    presets, taken under gcs."""
    assert open_s3(opened, storage_url=f"s3://{bucket}", **GCS).bucket == bucket
    with pytest.raises(ConfigurationError):
        open_storage(settings(storage_url=f"s3://{bucket}", s3_preset="minio"))


# https://cloud.google.com/storage/docs/buckets#naming: names GCS refuses that the union of
# S3's and GCS's character rules let through.
GCS_REFUSES = [
    ("b" * 64, "more than 63 characters without a dot"),
    ("a" * 64 + ".b", "a dot-separated component of more than 63 characters"),
    ("a.b" + "c" * 64, "a dot-separated component of more than 63 characters"),
    ("192.168.1.1", "formatted as an IP address"),
    ("goog-images", "the prefix goog is reserved"),
    ("googimages", "the prefix goog is reserved"),
    ("my-google-images", "it contains google or a close misspelling of it"),
    ("images.google.example", "it contains google or a close misspelling of it"),
    ("my-g00gle-images", "it contains google or a close misspelling of it"),
]


@pytest.mark.parametrize(("bucket", "why"), GCS_REFUSES, ids=[b[:20] for b, _ in GCS_REFUSES])
def test_a_bucket_name_gcs_refuses_is_refused_by_the_variable(bucket: str, why: str) -> None:
    """Taken, every request would be answered InvalidBucketName."""
    with pytest.raises(ConfigurationError) as error:
        open_storage(settings(storage_url=f"s3://{bucket}/images", **GCS))
    said = f"not a valid Google Cloud Storage bucket name ({why})"
    assert error.value.message == f"invalid IMAGEGEN_STORAGE_URL: {said}"
    assert error.value.errors == [{"field": "storage_url", "message": said}]


@pytest.mark.parametrize("bucket", ["my-goo-gle", "images-goog", "my.bucket.example.com", "abc"])
def test_a_bucket_name_gcs_takes_is_taken(opened: list[Storage], bucket: str) -> None:
    assert open_s3(opened, storage_url=f"s3://{bucket}", **GCS).bucket == bucket


@pytest.mark.parametrize(
    "bucket",
    ["abc", "my-bucket", "my.bucket.example.com", "b" * 63, "xn-bucket", "s3alias", "1.2.3"],
)
def test_a_bucket_name_s3_takes_is_taken(opened: list[Storage], bucket: str) -> None:
    assert open_s3(opened, storage_url=f"s3://{bucket}").bucket == bucket
