"""The Storage contract, run against every backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from imagegen.errors import InvalidRequest, NotFound
from imagegen.storage import GenerationKeys, LocalStorage, Storage, StoredObject
from tests.storage.conftest import MakeS3

KEYS = GenerationKeys("gen-0001", datetime(2026, 5, 1, 12, 30, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8

BAD_KEYS = [
    "../escape.png",
    "2026/../../escape.png",
    "/etc/passwd",
    "a\\b.png",
    "..\\..\\win.png",
    "a//b.png",
    "./a.png",
    ".hidden",
    "",
    # One segment is one file name on local disks (255 bytes), with the backend's own names
    # beside it: refused on every backend, the same as the other refusals.
    "2026/" + "x" * 201 + ".png",
]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, local: LocalStorage) -> Storage:
    if request.param == "local":
        return local
    make_s3: MakeS3 = request.getfixturevalue("make_s3")
    return make_s3()


def test_is_a_storage(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    assert storage.name in ("local", "s3")


async def test_round_trip(storage: Storage) -> None:
    stored = await storage.put(
        KEYS.image, PNG, content_type="image/png", metadata={"SHA256": "abc123", "seed": "42"}
    )

    assert stored == StoredObject(
        key=KEYS.image,
        location=storage.location(KEYS.image),
        size=len(PNG),
        content_type="image/png",
        metadata={"sha256": "abc123", "seed": "42"},
    )
    assert await storage.get(KEYS.image) == PNG
    assert await storage.head(KEYS.image) == stored


async def test_missing_object(storage: Storage) -> None:
    assert await storage.head(KEYS.image) is None
    with pytest.raises(NotFound):
        await storage.get(KEYS.image)


async def test_put_again_is_idempotent_and_replaces(storage: Storage) -> None:
    first = await storage.put(KEYS.image, PNG, content_type="image/png", metadata={"v": "1"})
    assert (
        await storage.put(KEYS.image, PNG, content_type="image/png", metadata={"v": "1"}) == first
    )

    await storage.put(KEYS.image, b"new", content_type="image/webp", metadata={"v": "2"})

    assert await storage.get(KEYS.image) == b"new"
    head = await storage.head(KEYS.image)
    assert head is not None
    assert (head.size, head.content_type, head.metadata) == (3, "image/webp", {"v": "2"})


async def test_image_and_record_are_separate_objects(storage: Storage) -> None:
    await storage.put(KEYS.image, PNG, content_type="image/png")
    await storage.put(KEYS.metadata, b"{}", content_type="application/json")

    assert await storage.get(KEYS.image) == PNG
    assert await storage.get(KEYS.metadata) == b"{}"


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_unsafe_keys_are_rejected(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidRequest) as put:
        await storage.put(key, PNG, content_type="image/png")
    with pytest.raises(InvalidRequest) as get:
        await storage.get(key)
    with pytest.raises(InvalidRequest) as head:
        await storage.head(key)
    with pytest.raises(InvalidRequest) as location:
        storage.location(key)

    for error in (put, get, head, location):
        assert error.value.fields == ["key"]


@pytest.mark.parametrize(
    "metadata",
    [
        {"bad name": "x"},
        {"x-": "caf\u00e9"},
        {"seed": "line\nbreak"},
        {"big": "x" * 3000},
        # An HTTP header's value: S3 would give back "padded" (RFC 9110, section 5.5).
        {"edge": " padded "},
        {"edge": "padded "},
    ],
)
async def test_bad_metadata_is_rejected(storage: Storage, metadata: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest) as error:
        await storage.put(KEYS.image, PNG, content_type="image/png", metadata=metadata)

    assert error.value.fields == ["metadata"]
    assert await storage.head(KEYS.image) is None


async def test_check_passes(storage: Storage) -> None:
    await storage.check()


async def test_create_writes_once_first_writer_wins(storage: Storage) -> None:
    assert await storage.create(KEYS.image, PNG, content_type="image/png", metadata={"v": "1"})
    again = await storage.create(
        KEYS.image, b"other", content_type="image/webp", metadata={"v": "2"}
    )

    assert again is False
    assert await storage.get(KEYS.image) == PNG
    head = await storage.head(KEYS.image)
    assert head is not None
    assert (head.content_type, head.metadata) == ("image/png", {"v": "1"})


async def test_an_object_created_without_metadata_is_not_written_over(storage: Storage) -> None:
    # S3 decides on the object alone; local storage's object is renamed after its sidecar.
    assert await storage.create(KEYS.image, b"FIRST", content_type="image/png")
    second = await storage.create(
        KEYS.image, b"SECOND", content_type="image/png", metadata={"sha256": "x"}
    )

    assert second is False
    assert await storage.get(KEYS.image) == b"FIRST"
    head = await storage.head(KEYS.image)
    assert head is not None and (head.content_type, head.metadata) == ("image/png", {})


async def test_racing_creates_have_exactly_one_winner(storage: Storage) -> None:
    bodies = [PNG + bytes([i]) for i in range(8)]
    won = await asyncio.gather(
        *(
            storage.create(KEYS.image, body, content_type="image/png", metadata={"n": str(i)})
            for i, body in enumerate(bodies)
        )
    )

    assert won.count(True) == 1
    winner = won.index(True)
    assert await storage.get(KEYS.image) == bodies[winner]
    head = await storage.head(KEYS.image)
    assert head is not None and head.metadata == {"n": str(winner)}


async def test_the_longest_segment_and_spaced_metadata_round_trip(storage: Storage) -> None:
    key = "2026/" + "x" * 196 + ".png"  # 200 characters: the most a segment may have
    await storage.put(key, PNG, content_type="image/png", metadata={"note": "a b", "empty": ""})
    stored = await storage.head(key)
    assert stored is not None and stored.metadata == {"note": "a b", "empty": ""}
    assert await storage.get(key) == PNG


async def test_create_validates_like_put(storage: Storage) -> None:
    with pytest.raises(InvalidRequest) as bad_key:
        await storage.create("../x.png", PNG, content_type="image/png")
    with pytest.raises(InvalidRequest) as bad_meta:
        await storage.create(KEYS.image, PNG, content_type="image/png", metadata={"a b": "x"})

    assert (bad_key.value.fields, bad_meta.value.fields) == (["key"], ["metadata"])
    assert await storage.head(KEYS.image) is None
