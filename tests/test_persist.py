"""Persist records only what render said of the stored PNG: a claim check is checked, field by
field, against the object in storage and the metadata render stored with it."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imagegen import (
    DependencyUnavailable,
    GenerationRequest,
    ImageGenService,
    InvalidRequest,
    Settings,
)
from imagegen.events import GENERATION_FAILED, IMAGE_RENDERED
from imagegen.models import MAX_PNG_BYTES, Contribution, EnhancedPrompt, RenderedImage
from imagegen.render import stored_png
from imagegen.storage import LocalStorage
from imagegen.storage.base import GenerationKeys, Storage
from tests.fakes.images import gradient_png as png
from tests.fakes.images import store_rendered
from tests.fakes.storage import reads_of
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event

NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)


async def _rendered(service: ImageGenService, generation_id: str) -> RenderedImage:
    """A 256 x 256 image of the tiny model, rendered and stored by the real render stage."""
    request = GenerationRequest(
        generation_id=generation_id,
        prompt="a harbour",
        width=256,
        height=256,
        seed=5,
        model="tiny",
        enhance=False,
        requested_at=NOW,
    )
    return await service.render(await service.enhance(request))


def _forgeries(rendered: RenderedImage) -> list[tuple[dict[str, Any], list[str]]]:
    """Claim checks for the stored image that say something else of it: each with the fields
    persist must name. Every value is one the models accept."""
    other_job = rendered.prompt.model_copy(update={"seed": 6})
    assert rendered.rendered_at is not None
    return [
        ({"width": 512}, ["width"]),
        ({"height": 512}, ["height"]),
        ({"size": rendered.size + 1}, ["size"]),
        ({"seed": 6}, ["seed"]),
        ({"model": "other"}, ["model"]),
        ({"steps": rendered.steps + 1}, ["steps"]),
        ({"guidance": 7.5}, ["guidance"]),
        ({"timings": {"denoise": 99.0}}, ["timings"]),
        ({"rendered_at": rendered.rendered_at + timedelta(hours=1)}, ["rendered_at"]),
        ({"width": 512, "size": 1, "seed": 6}, ["size", "width", "seed"]),
        # Another job, told consistently: its seed is the claim's, but not the stored image's.
        ({"prompt": other_job, "seed": 6}, ["prompt"]),
        # Render stores where persist reads: its reply names that place, and no other.
        ({"location": f"s3://other-bucket/{rendered.key}"}, ["location"]),
        ({"location": "file:///etc/passwd"}, ["location"]),
        ({"location": "http://evil.example/x.png"}, ["location"]),
        ({"location": "not a uri"}, ["location"]),
        ({"location": f"{rendered.location}/"}, ["location"]),
        ({"location": "not a uri", "seed": 6}, ["location", "seed"]),
    ]


async def test_a_claim_check_that_misdescribes_the_stored_image_is_refused_and_not_recorded(
    settings: Settings,
) -> None:
    async with ImageGenService(settings) as service:
        rendered = await _rendered(service, "forged-1")
        record = GenerationKeys("forged-1", NOW).metadata
        for update, fields in _forgeries(rendered):
            with pytest.raises(InvalidRequest) as caught:
                await service.persist(rendered.model_copy(update=update))
            assert sorted(caught.value.fields) == sorted(fields), update
            assert caught.value.status == 400 and not caught.value.retryable
            assert "does not describe the image stored" in caught.value.message
            assert await service.storage.head(record) is None, f"{update} was recorded"

        # A wrong digest is named, and the stored one is not told: knowing an id is not
        # enough to learn what is stored under it.
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered.model_copy(update={"sha256": "0" * 64}))
        assert caught.value.fields == ["sha256"]
        assert rendered.sha256 not in str(caught.value.to_dict())

        # Render's own event arrives afterwards: it is recorded, as render said it.
        persisted = await service.persist(rendered)
    said = rendered.model_dump(include={"size", "sha256", "width", "height", "seed", "model"})
    assert persisted.model_dump(include=set(said)) == said
    assert persisted.timings == rendered.timings and persisted.created_at == rendered.rendered_at


async def test_renders_reply_to_the_same_job_written_otherwise_is_recorded(
    settings: Settings,
) -> None:
    """Render answers a retried call from storage when its job is the same one written
    otherwise (the metadata's keys in another order, the time at another offset); its reply
    carries that call's job, which persist takes as the job the image came from."""
    async with ImageGenService(settings) as service:
        request = GenerationRequest(
            generation_id="rewritten-1",
            prompt="a kite",
            model="tiny",
            width=JOB_SIZE[0],
            height=JOB_SIZE[1],
            steps=2,
            seed=7,
            metadata={"b": "2", "a": "1"},
            requested_at=NOW,
        )
        job = await service.enhance(request)
        await service.render(job)
        rewritten = job.model_copy(
            update={
                "metadata": {"a": "1", "b": "2"},
                "requested_at": NOW.astimezone(timezone(timedelta(hours=2))),
            }
        )
        again = await service.render(rewritten)
        assert again.prompt.metadata == {"a": "1", "b": "2"}
        persisted = await service.persist(again)
        assert persisted.sha256 == again.sha256

        other = rewritten.model_copy(update={"metadata": {"a": "1", "b": "3"}})
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(again.model_copy(update={"prompt": other}))
        assert caught.value.fields == ["prompt"]


async def test_a_recorded_image_names_each_field_the_event_gets_wrong(settings: Settings) -> None:
    async with ImageGenService(settings) as service:
        rendered = await _rendered(service, "recorded-1")
        first = await service.persist(rendered)
        assert rendered.rendered_at is not None
        cases: list[tuple[dict[str, Any], list[str]]] = [
            # The right digest, a wrong size: the size is named, not the digest.
            ({"size": rendered.size + 1}, ["size"]),
            ({"width": 512}, ["width"]),
            ({"seed": 6}, ["seed"]),
            ({"timings": {}}, ["timings"]),
            ({"rendered_at": rendered.rendered_at - timedelta(days=1)}, ["rendered_at"]),
            ({"location": "file:///etc/passwd"}, ["location"]),
        ]
        for update, fields in cases:
            with pytest.raises(InvalidRequest) as caught:
                await service.persist(rendered.model_copy(update=update))
            assert caught.value.fields == fields, update
        assert await service.persist(rendered) == first


def test_the_persist_function_answers_out_of_range_values_with_a_400_naming_them(
    tmp_path: Path,
) -> None:
    """Values no request could carry, which the ledger's database could not hold either."""
    job = {
        "generation_id": "huge-1",
        "prompt": "a harbour",
        "enhancer": "passthrough",
        "model": "tiny",
        "width": 256,
        "height": 256,
        "steps": 2,
        "guidance": 0.0,
        "seed": 5,
        "requested_at": "2026-11-24T18:30:00Z",
    }
    rendered = {
        "generation_id": "huge-1",
        "key": "2026/11/24/huge-1.png",
        "location": "file:///nowhere/2026/11/24/huge-1.png",
        "size": 10**30,
        "sha256": "0" * 64,
        "width": 2**70,
        "height": 256,
        "seed": 2**64,
        "model": "tiny",
        "steps": 10**6,
        "guidance": 0.0,
        "rendered_at": "9999-01-01T00:00:00Z",
        "prompt": job,
    }
    with InProcessFunction("persist", base_env(tmp_path / "store")) as persist:
        reply = persist.post("/", json=rendered)
        # As an event: not retried, a generation.failed naming the same fields.
        event = post_event(persist, IMAGE_RENDERED, rendered, subject="huge-1")
    fields = {"size", "width", "seed", "steps", "rendered_at"}
    assert reply.status_code == 400, reply.text
    assert {error["field"] for error in reply.json()["errors"]} == fields
    assert event.status_code == 200 and event.headers["ce-type"] == GENERATION_FAILED
    assert {error["field"] for error in event.json()["error"]["errors"]} == fields
    assert not list((tmp_path / "store").rglob("*.json")), json.dumps(reply.json())


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b'{"persisted": {"generation_id": "corrupt-1", "ke',
        b'"a string"',
        b'{"persisted": {}}',
        b'{"persisted": {"generation_id": 5}, "request": {}}',
    ],
    ids=["empty", "cut short", "not an object", "no request", "invalid"],
)
async def test_a_corrupt_record_is_a_503_naming_it_at_every_redelivery(
    tmp_path: Path, corrupt: bytes
) -> None:
    """The record is written once: no retry mends a corrupt one, and a 400 would fail the
    generation over an object an operator can repair. The event waits, retried."""
    store = tmp_path / "out"
    async with ImageGenService(Settings(storage_url=str(store))) as service:
        rendered = await store_rendered(service.storage, "corrupt-1", NOW, png(256, 256), "a bay")
        await service.persist(rendered)
        record = GenerationKeys("corrupt-1", NOW).metadata
        (store / record).write_bytes(corrupt)
        for _ in range(2):
            with pytest.raises(DependencyUnavailable) as caught:
                await service.persist(rendered)
            assert (caught.value.status, caught.value.retryable) == (503, True)
            assert f"the stored record {record!r} is corrupt" in caught.value.message
            assert "repair or remove it: the next delivery writes it again" in caught.value.message
    assert (store / record).read_bytes() == corrupt  # written once: left for the operator

    with InProcessFunction("persist", base_env(store)) as persist:
        reply = post_event(persist, IMAGE_RENDERED, rendered.model_dump(mode="json"))
    assert reply.status_code == 503 and "Retry-After" in reply.headers, reply.text
    assert reply.json()["error"] == "dependency_unavailable"
    assert "Traceback" not in reply.text


async def test_a_record_a_newer_persist_wrote_answers_the_redelivery(tmp_path: Path) -> None:
    """Mid-rollout, a persist one release ahead may have written the record, with fields this
    release does not know (each optional, its default meaning "as before"), in an object it
    holds too: it is the generation's record, answered as it is, not a corrupt one (a 503 at
    every delivery, with advice to remove a valid record). A field it needs, missing, is
    still corrupt."""
    store = tmp_path / "out"
    async with ImageGenService(Settings(storage_url=str(store))) as service:
        stored = await store_rendered(service.storage, "newer-1", NOW, png(256, 256), "a bay")
        job = stored.prompt.model_copy(update={"contributions": [Contribution(plugin="time")]})
        rendered = stored.model_copy(update={"prompt": job})
        persisted = await service.persist(rendered)
        path = store / GenerationKeys("newer-1", NOW).metadata
        record = json.loads(path.read_text())
        record["persisted"]["thumbnail_format"] = "webp"
        record["request"]["style"] = None
        record["request"]["contributions"][0]["weight"] = 1.0
        path.write_text(json.dumps(record))

        assert await service.persist(rendered) == persisted

        del record["persisted"]["sha256"]
        path.write_text(json.dumps(record))
        with pytest.raises(DependencyUnavailable) as caught:
            await service.persist(rendered)
        assert "'persisted' is no valid PersistedImage: sha256" in caught.value.message


async def test_signed_urls_last_their_ttl_from_when_the_record_is_written(tmp_path: Path) -> None:
    """An image rendered a month ago and persisted now (a dead letter delivered again, a
    backlog) gets URLs that work for the whole TTL, not ones that expired before they were
    handed out."""
    from urllib.parse import parse_qs, urlsplit

    settings = Settings(
        storage_url=str(tmp_path / "out"),
        model="tiny",
        public_base_url="https://img.example.com/",
        url_signing_secret="s3cret-of-16-bytes",
    )
    month_ago = datetime.now(UTC) - timedelta(days=30)
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(service.storage, "late", month_ago, png(256, 256), "a kite")
        before = datetime.now(UTC)
        persisted = await service.persist(rendered)
    assert persisted.persisted_at is not None and persisted.persisted_at >= before.replace(
        microsecond=before.microsecond // 1000 * 1000
    )
    for url in persisted.urls.values():
        expires = int(parse_qs(urlsplit(url).query)["expires"][0])
        assert expires == int(persisted.persisted_at.timestamp()) + settings.signed_url_ttl


async def test_a_redelivery_is_held_to_the_rule_its_first_delivery_was(
    settings: Settings,
) -> None:
    """Render's digest of a job leaves ``enhanced_at`` out (``stored_png.fingerprint``): its
    replies to one job written at two times are both the image's. The first to reach persist
    was recorded, and the other, render's own, was refused afterwards as "not the job the
    image came from", though it had been recorded had it come first."""
    async with ImageGenService(settings) as service:
        job = await service.enhance(
            GenerationRequest(
                generation_id="enhanced-twice",
                prompt="a kite",
                model="tiny",
                width=JOB_SIZE[0],
                height=JOB_SIZE[1],
                steps=2,
                seed=7,
                requested_at=NOW,
            )
        )
        assert job.enhanced_at is not None
        rendered = await service.render(job)
        later = job.model_copy(update={"enhanced_at": job.enhanced_at + timedelta(seconds=1)})
        retold = await service.render(later)
        assert retold.prompt.enhanced_at != rendered.prompt.enhanced_at
        first = await service.persist(retold)
        assert await service.persist(rendered) == first
        assert await service.persist(retold) == first

        # Any other part of the job is still the job's.
        other = rendered.prompt.model_copy(update={"prompt": "a kite at dusk"})
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered.model_copy(update={"prompt": other}))
        assert caught.value.fields == ["prompt"]


async def test_created_at_is_in_utc_however_the_first_delivery_wrote_the_time(
    settings: Settings,
) -> None:
    """The record, the reply and its event's time kept the offset the first delivery wrote the
    time at (+05:30): the same image was told otherwise by how one event spelled it."""
    india = timezone(timedelta(hours=5, minutes=30))
    async with ImageGenService(settings) as service:
        rendered = await _rendered(service, "offset-1")
        assert rendered.rendered_at is not None
        at_offset = rendered.model_copy(
            update={"rendered_at": rendered.rendered_at.astimezone(india)}
        )
        persisted = await service.persist(at_offset)
        # Not rendered_at known (an object stored before it was kept): the request's time.
        requested = NOW.astimezone(india)
        unrendered = await store_rendered(service.storage, "offset-2", requested, _RENDERED, "x")
        from_request = await service.persist(unrendered)
        records = [
            json.loads(await service.storage.get(p.keys["metadata"]))
            for p in (persisted, from_request)
        ]
    for image, instant, record in zip(
        (persisted, from_request), (rendered.rendered_at, NOW), records, strict=True
    ):
        assert image.created_at == instant and image.created_at.utcoffset() == timedelta(0)
        assert image.occurred_at.utcoffset() == timedelta(0)  # the image.persisted event's time
        written = record["persisted"]["created_at"]
        assert written.endswith("Z") and datetime.fromisoformat(written) == instant


async def test_a_clock_behind_the_render_writes_no_persisted_at_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A persist pod whose clock was behind the render's wrote ``persisted_at`` before
    ``created_at``, and signed URLs counted from it: ten days behind, they had expired before
    the image was rendered."""
    from urllib.parse import parse_qs, urlsplit

    import imagegen.persist

    settings = Settings(
        storage_url=str(tmp_path / "out"),
        model="tiny",
        public_base_url="https://img.example.com/",
        url_signing_secret="s3cret-of-16-bytes",
    )
    rendered_at = datetime.now(UTC).replace(microsecond=123_456)
    behind = rendered_at - timedelta(days=10)
    monkeypatch.setattr(imagegen.persist, "stage_time", lambda: behind)
    async with ImageGenService(settings) as service:
        stored = await _stored_as_render(service.storage, "skew", _RENDERED, at=rendered_at)
        with caplog.at_level("WARNING", logger="imagegen.persist"):
            persisted = await service.persist(stored)
    # To the millisecond, as every stage time, and never before the render.
    assert persisted.persisted_at == rendered_at.replace(microsecond=124_000)
    assert persisted.created_at == rendered_at
    for url in persisted.urls.values():
        expires = int(parse_qs(urlsplit(url).query)["expires"][0])
        assert expires == int(rendered_at.timestamp()) + settings.signed_url_ttl
    [warning] = [r for r in caplog.records if r.name == "imagegen.persist"]
    assert "864000.000 s behind the image's created_at" in warning.getMessage()


# Objects at an image key that render did not make: stored with the metadata render writes.

JOB_SIZE = (256, 256)


async def _stored_as_render(
    storage: Storage,
    generation_id: str,
    data: bytes,
    *,
    timings: str | None = None,
    at: datetime = NOW,
) -> RenderedImage:
    """``data`` stored at a 256 x 256 job's image key with the metadata render writes, and
    render's own reply for it (rendered ``at``): only the bytes (or, given, the stored
    ``timings``) are not render's."""
    job = EnhancedPrompt(
        generation_id=generation_id,
        prompt="a kite",
        enhancer="passthrough",
        model="tiny",
        width=JOB_SIZE[0],
        height=JOB_SIZE[1],
        steps=2,
        guidance=0.0,
        seed=7,
        requested_at=NOW,
    )
    keys = GenerationKeys(generation_id, NOW)
    sha256 = hashlib.sha256(data).hexdigest()
    said = {"render": 0.5}
    metadata = stored_png.metadata(job, sha256, stored_png.fingerprint(job), said, at)
    if timings is not None:
        metadata["timings"] = timings
    await storage.put(keys.image, data, content_type="image/png", metadata=metadata)
    return stored_png.rendered_image(
        job,
        keys.image,
        storage.location(keys.image),
        size=len(data),
        sha256=sha256,
        stage_timings=said,
        at=at,
    )


def _png_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG's signature and header for ``width`` x ``height`` pixels, and no pixels: Pillow
    refuses to open it at all (over twice its ``MAX_IMAGE_PIXELS``)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _raw_png(
    *, filter_type: int = 0, compression: int = 0, filter_method: int = 0, interlace: int = 0
) -> bytes:
    """A 256 x 256 8-bit RGB PNG, every row after ``filter_type``, its IHDR naming the
    ``compression``, ``filter_method`` and ``interlace`` methods (PNG spec 11.2.2, 9.2)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", *JOB_SIZE, 8, 2, compression, filter_method, interlace)
    rows = (bytes([filter_type]) + bytes([100, 150, 200]) * JOB_SIZE[0]) * JOB_SIZE[1]
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _animated() -> bytes:
    """An APNG of two frames, red then blue, the first of them also its static image."""
    out = io.BytesIO()
    red, blue = Image.new("RGB", JOB_SIZE, (255, 0, 0)), Image.new("RGB", JOB_SIZE, (0, 0, 255))
    red.save(out, format="PNG", save_all=True, append_images=[blue], duration=100)
    return out.getvalue()


_RENDERED = png(*JOB_SIZE)


def _damaged(data: bytes, kind: bytes) -> bytes:
    """``data`` with one byte of its first ``kind`` chunk flipped, its CRC left as it was."""
    at = data.index(kind) + 4
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("data", "fields"),
    [
        (_png_of(*JOB_SIZE), []),  # render's own: recorded
        (b"GIF89a" + bytes(64), ["image"]),
        (_png_of(*JOB_SIZE)[:20], ["image"]),  # cut short inside its header
        (_png_of(512, 256), ["width"]),
        (_png_of(2000, 16), ["width", "height"]),
        (_bomb_header(20_000, 20_000), ["image"]),
        (_RENDERED[: len(_RENDERED) // 2], ["image"]),  # cut inside its pixel data (IDAT)
        (_RENDERED[:-12], ["image"]),  # every pixel, but no IEND
        (_damaged(_RENDERED, b"IDAT"), ["image"]),
        (_bomb_header(*JOB_SIZE), ["image"]),  # a header, and no pixel data at all
        (_raw_png(), []),  # the raw PNGs below are refused for what they change alone
        (_raw_png(filter_type=5), ["image"]),
        (_raw_png(compression=1), ["image"]),
        (_raw_png(filter_method=1), ["image"]),
        (_raw_png(interlace=2), ["image"]),
        (_animated(), ["image"]),
    ],
    ids=[
        "png",
        "gif",
        "cut short",
        "wider",
        "other size",
        "bomb",
        "cut in its pixels",
        "no end",
        "a damaged chunk",
        "no pixels",
        "raw png",
        "unknown filter type",
        "unknown compression method",
        "unknown filter method",
        "unknown interlace method",
        "animated",
    ],
)
async def test_a_stored_object_that_is_no_png_of_the_events_size_is_refused_unrecorded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, data: bytes, fields: list[str]
) -> None:
    """The digest matched and render's metadata too, so persist recorded the object as the
    event's 256 x 256 PNG: the Worker served it as one, and derive failed the generation for
    good, after the reply had said it was final. A PNG cut short in its pixel data was taken
    too, its header being whole, and so were rows of a filter type PNG does not have, and
    methods in its header that PNG does not have, which derive failed to decode or decoded
    as something else, and an animated PNG, whose frames a browser plays where every
    derivative shows one image. Its chunks are read, no pixel decoded."""

    def refuse(*args: Any) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "odd-1", data)
        record = GenerationKeys("odd-1", NOW).metadata
        if not fields:
            persisted = await service.persist(rendered)
            assert (persisted.width, persisted.height) == JOB_SIZE
            return
        for _ in range(2):  # a redelivery: the same answer
            with pytest.raises(InvalidRequest) as caught:
                await service.persist(rendered)
            assert caught.value.fields == fields
            assert (caught.value.status, caught.value.retryable) == (400, False)
        assert await service.storage.head(record) is None


@pytest.mark.parametrize(
    ("size", "fields"),
    [((8192, 8192), ["width", "height"]), ((8192, JOB_SIZE[1]), ["width"])],
    ids=["both sides", "wider"],
)
async def test_a_png_of_another_size_than_the_event_is_refused_before_its_pixels_are_inflated(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], fields: list[str]
) -> None:
    """A header far over any size render makes over a stream of zeros deflated to a few KiB:
    its pixel data (13000 x 13000 16-bit RGBA: 1.3 GB) was inflated, a CPU-second, before its
    size was compared with the event's. The header's size is compared first, and the PNG
    refused naming each side that differs, nothing inflated."""

    def refuse(png: bytes) -> None:
        raise AssertionError("inflated")

    monkeypatch.setattr("imagegen.persist.pixel_data_fault", refuse)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "wide-1", _png_of(*size))
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
        assert caught.value.fields == fields
        assert await service.storage.head(GenerationKeys("wide-1", NOW).metadata) is None


@pytest.mark.parametrize("rows", [10, JOB_SIZE[1] + 1], ids=["fewer rows", "more rows"])
async def test_a_png_whose_pixel_data_is_not_its_rows_is_refused_unrecorded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, rows: int
) -> None:
    """Every chunk whole and of its CRC, the deflate stream complete, but holding other than
    the header's rows: the verify of chunks took it, and derive then decoded the missing rows
    as black. The stream is inflated, never decoded, and refused naming the image."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    at = _RENDERED.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", _RENDERED, at)
    scanlines = zlib.decompress(_RENDERED[at + 8 : at + 8 + length])
    row = len(scanlines) // JOB_SIZE[1]
    other = (scanlines * 2)[: rows * row]
    data = _RENDERED[:at] + chunk(b"IDAT", zlib.compress(other)) + chunk(b"IEND", b"")
    assert _RENDERED.count(b"IDAT") == 1 and _RENDERED.endswith(chunk(b"IEND", b""))

    def refuse(*args: Any) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "rows-1", data)
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
        assert caught.value.fields == ["image"]
        assert await service.storage.head(GenerationKeys("rows-1", NOW).metadata) is None


async def test_the_persist_function_fails_the_generation_of_a_stored_object_that_is_no_png(
    tmp_path: Path,
) -> None:
    """At the edge: generation.failed naming the image, neither a success nor a 500."""
    store = tmp_path / "store"
    rendered = await _stored_as_render(LocalStorage(str(store)), "gif-1", b"GIF89a" + bytes(64))
    with InProcessFunction("persist", base_env(store)) as persist:
        reply = post_event(persist, IMAGE_RENDERED, rendered.model_dump(mode="json"))
    assert reply.status_code == 200 and reply.headers["ce-type"] == GENERATION_FAILED
    assert [error["field"] for error in reply.json()["error"]["errors"]] == ["image"]
    assert not (store / GenerationKeys("gif-1", NOW).metadata).exists()


async def test_the_persist_function_fails_the_generation_of_an_event_naming_another_location(
    tmp_path: Path,
) -> None:
    """An event that named any location (another bucket, a file path, not a URI) was recorded:
    the reply was built from the event's own. At the edge: generation.failed, or a 400 for a
    plain request, naming ``location``, nothing recorded."""
    store = tmp_path / "store"
    rendered = await _stored_as_render(LocalStorage(str(store)), "elsewhere-1", _RENDERED)
    data = rendered.model_dump(mode="json") | {"location": "s3://other-bucket/" + rendered.key}
    with InProcessFunction("persist", base_env(store)) as persist:
        event = post_event(persist, IMAGE_RENDERED, data)
        reply = persist.post("/", json=data)
    assert event.status_code == 200 and event.headers["ce-type"] == GENERATION_FAILED
    assert [error["field"] for error in event.json()["error"]["errors"]] == ["location"]
    assert reply.status_code == 400
    assert [error["field"] for error in reply.json()["errors"]] == ["location"]
    assert not (store / GenerationKeys("elsewhere-1", NOW).metadata).exists()


async def test_an_image_rendered_into_storage_since_moved_is_refused_naming_its_location(
    tmp_path: Path,
) -> None:
    """Render stored the image under one root, and persist reads another holding the same
    files (a storage move with events in flight): the event names where persist does not
    read, so it is refused, not recorded with a location no longer the image's
    (docs/storage.md: drain the events before a move)."""
    before, after = tmp_path / "before", tmp_path / "after"
    rendered = await _stored_as_render(LocalStorage(str(before)), "moved-1", _RENDERED)
    before.rename(after)
    async with ImageGenService(Settings(storage_url=str(after))) as service:
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
        assert caught.value.fields == ["location"]
        moved = rendered.model_copy(update={"location": service.storage.location(rendered.key)})
        assert (await service.persist(moved)).location == moved.location


@pytest.mark.parametrize("linked", ["2026", "2026/11"], ids=["root-entry", "deeper"])
async def test_a_folder_linked_outside_the_root_is_a_retryable_503_not_a_failed_generation(
    tmp_path: Path, linked: str
) -> None:
    """A folder of the storage moved onto another disk and linked back: the deployment's doing
    (no key leaves the root), so the event is retried, never failed for good with its image
    orphaned. A link among the root's own entries is found at start-up (not ready), one deeper
    by the request that meets it; either way a 503 naming the setting and the link."""
    store, other = tmp_path / "store", tmp_path / "other-disk"
    rendered = await _stored_as_render(LocalStorage(str(store)), "linked-1", _RENDERED)
    (other / linked).parent.mkdir(parents=True)
    (store / linked).rename(other / linked)
    (store / linked).symlink_to(other / linked, target_is_directory=True)
    data = rendered.model_dump(mode="json")

    with InProcessFunction("persist", base_env(store)) as persist:
        event = post_event(persist, IMAGE_RENDERED, data, subject="linked-1")
        reply = persist.post("/", json=data)
    for answer in (event, reply):
        assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
        assert "ce-type" not in answer.headers  # no generation.failed
        body = answer.json()
        assert (body["error"], body["retryable"]) == ("not_configured", True)
        assert [error["field"] for error in body["errors"]] == ["storage_url"]
        assert f"{str(store / linked)!r} is a symbolic link that leads outside" in body["message"]
    assert (other / GenerationKeys("linked-1", NOW).image).exists()
    assert not (other / GenerationKeys("linked-1", NOW).metadata).exists()


@pytest.mark.parametrize("timings", ['{"render":"fast"}', '{"render":null}', '{"render":NaN}'])
async def test_stored_timings_that_are_no_numbers_are_read_as_none(
    settings: Settings, timings: str
) -> None:
    """Metadata render did not write raised a bare ValueError or TypeError: a 500, retried
    at every delivery. Unreadable, they are no timings, to render and persist alike."""
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(
            service.storage, "foreign-1", png(*JOB_SIZE), timings=timings
        )
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)  # says timings the object does not hold
        assert caught.value.fields == ["timings"]

        # What render answers for the object on a redelivery is what persist takes.
        job, keys = rendered.prompt, GenerationKeys("foreign-1", NOW)
        stored = await service.storage.head(keys.image)
        fingerprint = stored_png.fingerprint(job)
        answer = stored_png.answer(job, stored, fingerprint, rendered.location)
        assert answer is not None and answer.timings == {}
        persisted = await service.persist(answer)
    assert persisted.timings == {}


async def test_an_object_of_another_size_than_the_event_says_is_refused_unread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """persist read the whole object, then named its digest: 64 MiB under an event of 1000
    bytes was read into a pod of 1 GiB. The size is checked first, from the object's head."""
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "huge-1", bytes(8 << 20))
        missing = await _stored_as_render(service.storage, "none-1", png(*JOB_SIZE))
        (Path(settings.storage_url) / missing.key).unlink()
        read = reads_of(service.storage, monkeypatch)
        claim = rendered.model_copy(update={"size": 1000, "sha256": "0" * 64})
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(claim)
        assert caught.value.fields == ["size"]

        # Nothing under the key: named as before, and nothing read either.
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(missing)
        assert caught.value.fields == ["key"]
        assert read == []

        # Of the size the event gives, the object is read, and its digest checked.
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered.model_copy(update={"sha256": "0" * 64}))
        assert caught.value.fields == ["sha256"]
    assert read == [rendered.key]


def _with_private_chunk(png: bytes, size: int) -> bytes:
    """``png`` with a private ancillary chunk (``prIv``) before its end, ``size`` bytes in all:
    a PNG as valid as before, of the same pixels, larger in bytes alone."""
    body = bytes(size - len(png) - 12)
    chunk = (
        struct.pack(">I", len(body))
        + b"prIv"
        + body
        + struct.pack(">I", zlib.crc32(b"prIv" + body))
    )
    return png[:-12] + chunk + png[-12:]  # the last 12 bytes: IEND


def test_the_byte_bound_covers_every_png_render_can_make() -> None:
    """Render's largest image at PNG's widest samples (16-bit RGBA, 8 bytes a pixel) fits,
    with room for the filter bytes, deflate's framing and an ICC profile."""
    sides = RenderedImage.model_json_schema()["properties"]
    largest = sides["width"]["maximum"] * sides["height"]["maximum"] * 8
    assert largest + (4 << 20) <= MAX_PNG_BYTES <= 64 << 20


async def test_a_png_larger_in_bytes_than_any_render_makes_is_refused_unread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 256 x 256 PNG made 340 MiB by one ancillary chunk passed every check: its size was
    the event's, its header the job's. persist read it whole, derive decoded it whole, and a
    pod of 1 GiB was killed at every delivery. It is refused from its HEAD, never read."""
    data = _with_private_chunk(png(*JOB_SIZE), MAX_PNG_BYTES + 1)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "chunky-1", data)
        read = reads_of(service.storage, monkeypatch)
        for _ in range(2):  # a redelivery: the same answer
            with pytest.raises(InvalidRequest) as caught:
                await service.persist(rendered)
            assert caught.value.fields == ["size"]
            assert "larger than any render makes" in caught.value.message
        assert await service.storage.head(GenerationKeys("chunky-1", NOW).metadata) is None
        assert read == []

        # One byte less is a PNG render could have made: read, and recorded.
        fitting = _with_private_chunk(png(*JOB_SIZE), MAX_PNG_BYTES)
        persisted = await service.persist(
            await _stored_as_render(service.storage, "chunky-2", fitting)
        )
    assert persisted.size == MAX_PNG_BYTES


async def test_an_image_read_cut_short_is_a_retryable_503_not_a_failed_generation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download that ended early (a reset the store's client let through, a proxy that
    truncates) gave bytes of another digest, and persist failed the generation for good
    ("does not match the event"). Fewer bytes than the store said it holds is a storage
    fault: a 503, and the next delivery, reading it whole, persists the image."""
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "short-1", png(*JOB_SIZE))
        get = service.storage.get

        async def cut_short(key: str) -> bytes:
            data = await get(key)
            return data[: len(data) // 2] if key == rendered.key else data

        monkeypatch.setattr(service.storage, "get", cut_short)
        with pytest.raises(DependencyUnavailable) as caught:
            await service.persist(rendered)
        assert caught.value.status == 503 and caught.value.retry_after
        assert rendered.key in caught.value.message
        metadata = GenerationKeys.of_image("short-1", rendered.key).metadata
        assert await service.storage.head(metadata) is None

        monkeypatch.setattr(service.storage, "get", get)
        persisted = await service.persist(rendered)
    assert persisted.sha256 == rendered.sha256


def _chunk(kind: bytes, body: bytes) -> bytes:
    """A chunk: its length, type, data and CRC-32 over type and data (PNG spec 5.3)."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _chunked_png(
    colour_type: int, *, before: bytes = b"", after: bytes = b"", channels: int = 1
) -> bytes:
    """A 256 x 256 8-bit PNG of ``colour_type``, ``before`` its IDAT and ``after`` it."""
    header = struct.pack(">IIBBBBB", *JOB_SIZE, 8, colour_type, 0, 0, 0)
    rows = (b"\x00" + bytes(range(256)) * channels) * JOB_SIZE[1]
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + before
        + _chunk(b"IDAT", zlib.compress(rows))
        + after
        + _chunk(b"IEND", b"")
    )


_PLTE = _chunk(b"PLTE", bytes(range(256)) * 3)
_TWO_MIB = zlib.compress(b"a" * (2 << 20))  # of text or a profile: 2 KiB deflated
_HALF_MIB = zlib.compress(b"a" * (1 << 19))
_WHOLE_MIB = zlib.compress(b"a" * (1 << 20))
_OVER_ALL = "a PNG whose text and profile chunks hold more than 67,108,864 bytes in all"

# Each: the PNG, what persist says of it (None: taken), whether libpng reads it.
PALETTES_AND_CHUNKS: dict[str, tuple[bytes, str | None, bool]] = {
    "palette": (_chunked_png(3, before=_PLTE), None, True),
    "palette without PLTE": (_chunked_png(3), "a palette PNG without a PLTE chunk", False),
    "palette with PLTE after IDAT": (
        _chunked_png(3, after=_PLTE),
        "a palette PNG without a PLTE chunk",
        False,
    ),
    # libpng refuses these (pngrutil.c png_handle_PLTE: "PLTE: invalid", "PLTE: duplicate",
    # in a grey PNG too; pngset.c png_set_PLTE: "Invalid palette"); Pillow took them.
    "palette with PLTE of 4 bytes": (
        _chunked_png(3, before=_chunk(b"PLTE", bytes(4))),
        "a palette PNG whose PLTE chunk is not whole palette entries",
        False,
    ),
    "palette with empty PLTE": (
        _chunked_png(3, before=_chunk(b"PLTE", b"")),
        "a PNG with an empty PLTE chunk",
        False,
    ),
    "palette with two PLTE": (
        _chunked_png(3, before=_PLTE + _PLTE),
        "a PNG with two PLTE chunks",
        False,
    ),
    "grey with two PLTE": (
        _chunked_png(0, before=_PLTE + _PLTE),
        "a PNG with two PLTE chunks",
        False,
    ),
    # A truecolour PNG's PLTE is a suggestion: one not of whole entries libpng ignores.
    "RGB with PLTE of 4 bytes": (
        _chunked_png(2, before=_chunk(b"PLTE", bytes(4)), channels=3),
        None,
        True,
    ),
    # libpng ignores a tRNS before the PLTE ("tRNS: out of place") and shows the image.
    "palette with tRNS before PLTE": (
        _chunked_png(3, before=_chunk(b"tRNS", b"\0") + _PLTE),
        None,
        True,
    ),
    # PNG forbids it; libpng warns ("ignored in grayscale PNG") and reads the image.
    "grey with PLTE": (_chunked_png(0, before=_PLTE), None, True),
    "grey and alpha with PLTE": (_chunked_png(4, before=_PLTE, channels=2), None, True),
    "zTXt of 512 KiB": (
        _chunked_png(2, before=_chunk(b"zTXt", b"k\0\0" + _HALF_MIB), channels=3),
        None,
        True,
    ),
    "zTXt of 2 MiB": (
        _chunked_png(2, before=_chunk(b"zTXt", b"k\0\0" + _TWO_MIB), channels=3),
        "a PNG whose zTXt chunk inflates to more than 1,048,576 bytes",
        True,
    ),
    "zTXt of 2 MiB after IDAT": (
        _chunked_png(2, after=_chunk(b"zTXt", b"k\0\0" + _TWO_MIB), channels=3),
        "a PNG whose zTXt chunk inflates to more than 1,048,576 bytes",
        True,
    ),
    "iTXt of 2 MiB": (
        _chunked_png(2, before=_chunk(b"iTXt", b"k\0\x01\0\0\0" + _TWO_MIB), channels=3),
        "a PNG whose iTXt chunk inflates to more than 1,048,576 bytes",
        True,
    ),
    "iCCP of 2 MiB": (
        _chunked_png(2, before=_chunk(b"iCCP", b"p\0\0" + _TWO_MIB), channels=3),
        "a PNG whose iCCP chunk inflates to more than 1,048,576 bytes",
        True,
    ),
    "65 zTXt of 1 MiB": (
        _chunked_png(2, before=_chunk(b"zTXt", b"k\0\0" + _WHOLE_MIB) * 65, channels=3),
        _OVER_ALL,
        True,
    ),
    # No keyword: Pillow keeps no text of them, but inflated each, 1 MiB at a time, unbounded.
    "65 zTXt of 1 MiB without a keyword after IDAT": (
        _chunked_png(2, after=_chunk(b"zTXt", b"\0\0" + _WHOLE_MIB) * 65, channels=3),
        _OVER_ALL,
        True,
    ),
    "33 profiles and 32 zTXt of 1 MiB": (
        _chunked_png(
            2,
            before=_chunk(b"iCCP", b"p\0\0" + _WHOLE_MIB) * 33,
            after=_chunk(b"zTXt", b"k\0\0" + _WHOLE_MIB) * 32,
            channels=3,
        ),
        _OVER_ALL,
        True,
    ),
    "64 zTXt of 1 MiB without a keyword": (
        _chunked_png(2, after=_chunk(b"zTXt", b"\0\0" + _WHOLE_MIB) * 64, channels=3),
        None,
        True,
    ),
    # Pillow's chunk handlers raise on each as derive loads the image (after IDAT) or as it
    # opens it (before): an IndexError (no method after the NUL), a SyntaxError (another
    # method, no NUL), a ValueError (a chunk shorter than its fields).
    "empty iCCP after IDAT": (
        _chunked_png(2, after=_chunk(b"iCCP", b""), channels=3),
        "a PNG whose iCCP chunk has no NUL after its profile name",
        True,
    ),
    "iCCP without its method after IDAT": (
        _chunked_png(2, after=_chunk(b"iCCP", b"p\0"), channels=3),
        "a PNG whose iCCP chunk has no compression method after its profile name",
        True,
    ),
    "iCCP of method 1 after IDAT": (
        _chunked_png(2, after=_chunk(b"iCCP", b"p\0\x01" + _HALF_MIB), channels=3),
        "a PNG whose iCCP chunk names compression method 1, not 0 (deflate)",
        True,
    ),
    "iCCP of method 1": (
        _chunked_png(2, before=_chunk(b"iCCP", b"p\0\x01" + _HALF_MIB), channels=3),
        "a PNG whose iCCP chunk names compression method 1, not 0 (deflate)",
        True,
    ),
    "zTXt of method 1 after IDAT": (
        _chunked_png(2, after=_chunk(b"zTXt", b"k\0\x01" + _HALF_MIB), channels=3),
        "a PNG whose zTXt chunk names compression method 1, not 0 (deflate)",
        True,
    ),
    "gAMA of 2 bytes after IDAT": (
        _chunked_png(2, after=_chunk(b"gAMA", b"\0\0"), channels=3),
        "a PNG whose gAMA chunk is shorter than the decoder here reads of it (2 of 4 bytes)",
        True,
    ),
    "tRNS of a grey sample in an RGB PNG after IDAT": (
        _chunked_png(2, after=_chunk(b"tRNS", b"\0\0"), channels=3),
        "a PNG whose tRNS chunk is shorter than the decoder here reads of it (2 of 6 bytes)",
        True,
    ),
    "fdAT without an fcTL after IDAT": (
        _chunked_png(2, after=_chunk(b"fdAT", bytes(8)), channels=3),
        "a PNG whose fdAT chunk is out of the order APNG's frame chunks are numbered in",
        True,
    ),
    # What Pillow takes: an iTXt of another method it skips, as libpng does; a zTXt without
    # a NUL is one keyword; a stream that does not inflate is ignored.
    "iTXt of method 1 after IDAT": (
        _chunked_png(2, after=_chunk(b"iTXt", b"k\0\x01\x01\0\0" + _HALF_MIB), channels=3),
        None,
        True,
    ),
    "zTXt without a NUL after IDAT": (
        _chunked_png(2, after=_chunk(b"zTXt", b"k\x01"), channels=3),
        None,
        True,
    ),
    "zTXt of a damaged stream after IDAT": (
        _chunked_png(2, after=_chunk(b"zTXt", b"k\0\0not deflate"), channels=3),
        None,
        True,
    ),
}


def _libpng_reads(data: bytes) -> bool | None:
    """Whether libpng's simplified API reads ``data`` whole as RGBA; None without libpng."""
    import ctypes
    import ctypes.util

    found = ctypes.util.find_library("png16")
    if found is None:
        return None
    libpng = ctypes.CDLL(found)

    class PngImage(ctypes.Structure):  # png_image (png.h), PNG_IMAGE_VERSION 1
        _fields_ = [
            ("opaque", ctypes.c_void_p),
            ("version", ctypes.c_uint32),
            ("width", ctypes.c_uint32),
            ("height", ctypes.c_uint32),
            ("format", ctypes.c_uint32),
            ("flags", ctypes.c_uint32),
            ("colormap_entries", ctypes.c_uint32),
            ("warning_or_error", ctypes.c_uint32),
            ("message", ctypes.c_char * 64),
        ]

    image = PngImage(version=1)
    source = ctypes.create_string_buffer(data, len(data))
    if not libpng.png_image_begin_read_from_memory(
        ctypes.byref(image), source, ctypes.c_size_t(len(data))
    ):
        return False
    image.format = 3  # PNG_FORMAT_RGBA
    pixels = ctypes.create_string_buffer(image.width * image.height * 4)
    return bool(libpng.png_image_finish_read(ctypes.byref(image), None, pixels, 0, None))


@pytest.mark.parametrize("case", list(PALETTES_AND_CHUNKS))
async def test_a_png_libpng_refuses_or_this_decoder_cannot_read_is_refused_unrecorded(
    settings: Settings, case: str
) -> None:
    """A palette PNG without a PLTE before its pixels was taken, and derived with a grey
    palette Pillow made up, where libpng, and so a browser, refuses it; a text or profile
    chunk past what Pillow inflates, or one Pillow's chunk handler raises on (an iCCP chunk
    with no method after its NUL, a zTXt or iCCP chunk of another method, a chunk shorter than
    its fields), was refused as "not a PNG" (before the pixels) or taken and failed by derive
    for good (after them), where libpng reads the image; text and profile chunks holding
    more than 64 MiB in all were taken where they had no keyword or were profiles. Each is
    refused naming the image, saying why; what libpng reads and Pillow can, a PLTE in a grey
    PNG included, is taken."""
    data, said, libpng_reads = PALETTES_AND_CHUNKS[case]
    assert _libpng_reads(data) in (libpng_reads, None)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "chunks-1", data)
        if said is None:
            persisted = await service.persist(rendered)
            assert (persisted.width, persisted.height) == JOB_SIZE
            return
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
        assert caught.value.fields == ["image"]
        assert caught.value.errors[0]["message"].startswith(said)
        assert await service.storage.head(GenerationKeys("chunks-1", NOW).metadata) is None


async def test_the_text_chunks_of_one_png_are_inflated_no_further_than_the_total_allows(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thousand keyword-less zTXt chunks of 1 MiB each (1 MB of PNG) were each inflated, a
    GiB in all (ten thousand took ten seconds, holding up every other request), and taken:
    Pillow counts no text without a keyword. The walk stops once the chunks hold more than
    64 MiB, and the PNG is refused naming the image."""
    inflated = 0
    real = zlib.decompressobj

    class Counted:
        def __init__(self) -> None:
            self.inflater = real()

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            nonlocal inflated
            out = self.inflater.decompress(data, max_length)
            inflated += len(out)
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inflater, name)

    bomb = _chunk(b"zTXt", b"\0\0" + zlib.compress(bytes(1 << 20), 9))
    data = _chunked_png(2, after=bomb * 1000, channels=3)
    monkeypatch.setattr("imagegen.png.zlib.decompressobj", Counted)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "many-1", data)
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
    assert caught.value.fields == ["image"]
    assert caught.value.errors[0]["message"].startswith(_OVER_ALL)
    assert inflated <= 66 << 20  # 64 MiB and the chunk that passed it


async def test_a_stored_png_is_checked_off_the_event_loop(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its chunks walked and inflated, its pixel data inflated: CPU work that held up every
    request beside it while it ran on the event loop's thread."""
    import threading

    from imagegen import persist

    threads = []
    check = persist._png_size

    def watched(png: bytes, described: tuple[int, int]) -> tuple[int, int] | str:
        threads.append(threading.current_thread())
        return check(png, described)

    monkeypatch.setattr(persist, "_png_size", watched)
    async with ImageGenService(settings) as service:
        rendered = await _stored_as_render(service.storage, "thread-1", _chunked_png(2, channels=3))
        await service.persist(rendered)
    assert threads and threading.main_thread() not in threads


async def test_the_urls_persist_writes_are_the_base_as_browsers_write_it(tmp_path: Path) -> None:
    """A base browsers rewrite (an upper-case host, the default port) is taken, as it was
    before the check browsers' parsing is held to, and the records hold the URLs browsers
    request."""
    settings = Settings(
        storage_url=str(tmp_path / "out"), public_base_url="https://Images.Example.com:443"
    )
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(service.storage, "base-1", NOW, png(256, 256), "a kite")
        persisted = await service.persist(rendered)
    assert persisted.url == f"https://images.example.com/{rendered.key}"
    assert all(url.startswith("https://images.example.com/") for url in persisted.urls.values())
