"""S3Storage.head reads user metadata from x-amz-meta-* and from GCS's x-goog-meta-* headers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from imagegen.storage import GenerationKeys
from imagegen.storage.s3 import _user_metadata
from tests.fakes.s3_server import S3Server
from tests.storage.conftest import MakeS3

KEYS = GenerationKeys("gen-0003", datetime(2026, 5, 2, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
META = {"sha256": "9f86d081884c7d65", "generation-id": "gen-0003"}


@pytest.fixture
def gcs_headers(s3: S3Server) -> Iterator[S3Server]:
    """The server answering user metadata as x-goog-meta-* headers, for one test."""
    s3.gcs_metadata = True
    yield s3
    s3.gcs_metadata = False


@pytest.mark.parametrize("preset", ["aws", "gcs"])
async def test_head_reads_x_amz_meta_headers(make_s3: MakeS3, preset: str) -> None:
    storage = make_s3(preset)
    await storage.put(KEYS.image, PNG, content_type="image/png", metadata=META)

    stored = await storage.head(KEYS.image)

    assert stored is not None and stored.metadata == META


@pytest.mark.parametrize("preset", ["aws", "gcs"])
async def test_head_reads_x_goog_meta_headers(
    gcs_headers: S3Server, bucket: str, make_s3: MakeS3, preset: str
) -> None:
    storage = make_s3(preset)
    await storage.put(KEYS.image, PNG, content_type="image/png", metadata=META)

    stored = await storage.head(KEYS.image)

    assert stored is not None and stored.metadata == META
    assert stored.size == len(PNG) and stored.content_type == "image/png"
    # What boto3 alone makes of such an answer: no Metadata at all.
    raw = storage._client.head_object(Bucket=bucket, Key=KEYS.image)
    assert raw["Metadata"] == {}
    assert raw["ResponseMetadata"]["HTTPHeaders"]["x-goog-meta-sha256"] == META["sha256"]


async def test_head_without_metadata_has_none(gcs_headers: S3Server, make_s3: MakeS3) -> None:
    storage = make_s3("gcs")
    await storage.put(KEYS.image, PNG, content_type="image/png")

    stored = await storage.head(KEYS.image)

    assert stored is not None and stored.metadata == {}


def test_x_amz_meta_wins_over_x_goog_meta() -> None:
    response = {
        "Metadata": {"sha256": "from-amz"},
        "ResponseMetadata": {
            "HTTPHeaders": {
                "x-goog-meta-sha256": "from-goog",
                "X-Goog-Meta-Seed": "42",
                "x-goog-meta-": "nameless",
                "x-goog-generation": "1700000000",
            }
        },
    }

    assert _user_metadata(response) == {"sha256": "from-amz", "seed": "42"}
