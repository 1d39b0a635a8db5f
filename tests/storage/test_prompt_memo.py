"""Enhance's prompt memo on a real S3 server: found whatever the day, never answered around."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagegen import GenerationRequest, ImageGenService, Settings
from imagegen.errors import DependencyUnavailable
from imagegen.stages import Call
from imagegen.storage import LocalStorage
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.s3_server import S3Server
from tests.storage.conftest import MakeS3

DAY = datetime(2026, 11, 24, 23, 59, 59, tzinfo=UTC)
NEXT_DAY = datetime(2026, 11, 25, 0, 0, 1, tzinfo=UTC)
NOWHERE = "http://127.0.0.1:9"  # nothing listens: Ollama is down


def request() -> GenerationRequest:
    return GenerationRequest(prompt="a heron", model="tiny", width=256, height=256)


def at(generation_id: str, when: datetime) -> Call:
    return Call(generation_id=generation_id, requested_at=when)


MakeService = Callable[[object, str], ImageGenService]


@pytest.fixture
async def service() -> AsyncIterator[MakeService]:
    """``service(storage, ollama_url)``: a service keeping its prompts in ``storage``; each one
    closed as the test ends, as a function closes its own (its Ollama client's connections)."""
    made: list[ImageGenService] = []

    def make(storage: object, ollama: str) -> ImageGenService:
        settings = Settings(model="tiny", ollama_host=ollama, ollama_retries=0)
        made.append(ImageGenService(settings, storage=storage))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for each in made:
        await each.aclose()


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        fake.reply_with('{"prompt": "a heron in morning fog, ink wash"}')
        yield fake


def keys(s3: S3Server, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket)
    # Not the storage's check of conditional writes (imagegen-check/...): no generation's.
    keys = [item["Key"] for item in listed.get("Contents", [])]
    return [key for key in keys if not key.startswith("imagegen-check/")]


async def test_a_delivery_on_another_day_gets_the_first_prompt(
    make_s3: MakeS3, s3: S3Server, bucket: str, ollama: FakeOllama, service: MakeService
) -> None:
    # An event without a time takes the moment it arrives: either side of midnight here.
    storage = make_s3()
    first = await service(storage, ollama.url).enhance(request(), at("memo-day", DAY))
    again = await service(storage, NOWHERE).enhance(request(), at("memo-day", NEXT_DAY))
    assert again == first
    assert first.enhancer.startswith("ollama:") and first.requested_at == DAY
    assert keys(s3, bucket) == ["prompts/memo-day.json"]


async def test_a_memo_storage_cannot_read_fails_the_delivery_retryably(
    make_s3: MakeS3, s3: S3Server, ollama: FakeOllama, service: MakeService
) -> None:
    storage = make_s3()
    first = await service(storage, ollama.url).enhance(request(), at("memo-unread", DAY))
    s3.down(status=503)
    with pytest.raises(DependencyUnavailable):  # not the template prompt Ollama's absence gives
        await service(storage, NOWHERE).enhance(request(), at("memo-unread", DAY))
    s3.up()
    assert await service(storage, NOWHERE).enhance(request(), at("memo-unread", DAY)) == first


async def test_a_prompt_storage_cannot_keep_is_not_answered(
    make_s3: MakeS3, s3: S3Server, bucket: str, ollama: FakeOllama, service: MakeService
) -> None:
    storage = make_s3()
    s3.down(status=503)
    with pytest.raises(DependencyUnavailable):
        await service(storage, ollama.url).enhance(request(), at("memo-unkept", DAY))
    s3.up()
    assert keys(s3, bucket) == []
    # The next delivery writes the prompt that stands, and every later one repeats it.
    ollama.reply_with('{"prompt": "a heron over a frozen lake, woodcut"}')
    kept = await service(storage, ollama.url).enhance(request(), at("memo-unkept", DAY))
    again = await service(storage, NOWHERE).enhance(request(), at("memo-unkept", DAY))
    assert again == kept and "frozen lake" in kept.prompt


class _LostRace(LocalStorage):
    """A store where another writer's memo is there at the write and gone at the read."""

    async def create(self, key: str, data: bytes, **kwargs: object) -> bool:
        return False


async def test_a_memo_gone_between_the_lost_write_and_its_read_fails_retryably(
    tmp_path: Path, ollama: FakeOllama, service: MakeService
) -> None:
    with pytest.raises(DependencyUnavailable, match="vanished"):
        await service(_LostRace(tmp_path), ollama.url).enhance(request(), at("memo-gone", DAY))


async def test_a_memo_copied_under_another_generation_is_corrupt_not_its_prompt(
    make_s3: MakeS3, s3: S3Server, bucket: str, ollama: FakeOllama, service: MakeService
) -> None:
    storage = make_s3()
    first = await service(storage, ollama.url).enhance(request(), at("memo-source", DAY))
    source = {"Bucket": bucket, "Key": "prompts/memo-source.json"}
    s3.client().copy_object(Bucket=bucket, Key="prompts/memo-copy.json", CopySource=source)
    # The same request, so the digest matches: only the prompt's generation tells them apart.
    with pytest.raises(DependencyUnavailable, match=r"'prompts/memo-copy.json' is corrupt"):
        await service(storage, NOWHERE).enhance(request(), at("memo-copy", DAY))
    assert await service(storage, NOWHERE).enhance(request(), at("memo-source", DAY)) == first
