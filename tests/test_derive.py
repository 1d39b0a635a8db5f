"""The derive stage: derivatives of a persisted image, once, whoever and however often asks."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import imagegen.derive
from imagegen import DependencyUnavailable, ImageGenService, InvalidRequest, Settings
from imagegen.events import IMAGE_PERSISTED
from imagegen.models import MAX_PNG_BYTES, PersistedImage, RenderedImage
from imagegen.storage import LocalStorage
from tests.fakes.images import gradient_png as png
from tests.fakes.images import store_rendered
from tests.fakes.storage import CountingStorage, reads_of
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event

NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)


def settings(root: Path, widths: list[int]) -> Settings:
    return Settings(storage_url=str(root), derivative_widths=widths)


async def stored(service: ImageGenService, gid: str) -> RenderedImage:
    """A rendered image as render leaves it: the PNG stored, the claim check returned."""
    # The smallest size a job may ask for, which is also the thumbnail's: it keeps its size.
    return await store_rendered(service.storage, gid, NOW, png(256, 256), "a kite")


async def test_thumbnail_and_derivatives_are_recorded_after_every_one_is_stored(
    tmp_path: Path,
) -> None:
    async with ImageGenService(settings(tmp_path, [32, 64])) as service:
        persisted = await service.persist(await stored(service, "d-1"))
        derived = await service.derive(persisted)
    assert derived.generation_id == "d-1" and derived.sha256 == persisted.sha256
    assert derived.created_at == persisted.created_at == derived.occurred_at
    record = json.loads((tmp_path / derived.keys["record"]).read_text())
    assert record == {"derived": derived.model_dump(mode="json")}
    assert derived.keys["record"] == "2026/11/24/d-1.derivatives.json"
    assert derived.keys["thumbnail"] == persisted.keys["thumbnail"] == "2026/11/24/d-1.thumb.webp"
    with Image.open(tmp_path / derived.keys["thumbnail"]) as thumbnail:
        assert (thumbnail.format, thumbnail.size) == ("WEBP", (256, 256))
    names = sorted(k for k in derived.keys if k not in ("record", "thumbnail"))
    assert names == ["avif:256", "avif:32", "avif:64", "webp:256", "webp:32", "webp:64"]
    for name in names:
        fmt, width = name.split(":")
        with Image.open(tmp_path / derived.keys[name]) as image:
            assert (image.format, image.width) == (fmt.upper(), int(width))


async def test_a_redelivery_is_answered_from_the_record_without_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-2"))
        first = await service.derive(persisted)

        def refuse(*args: Any) -> None:
            raise AssertionError("encoded again")

        for encoder in ("make_derivatives", "make_derivative", "make_thumbnail"):
            monkeypatch.setattr(f"imagegen.derive.{encoder}", refuse)
        assert await service.derive(persisted) == first


async def test_a_redelivery_remakes_what_the_record_lists_and_storage_lost(
    tmp_path: Path,
) -> None:
    storage = CountingStorage(tmp_path)
    async with ImageGenService(settings(tmp_path, [32, 64]), storage=storage) as service:
        persisted = await service.persist(await stored(service, "d-lost"))
        storage.heads = 0
        first = await service.derive(persisted)
        # A first delivery asks about nothing it writes, only the PNG's size before reading it.
        assert storage.heads == 1
        files = {n: (tmp_path / k).read_bytes() for n, k in first.keys.items() if n != "record"}
        # A bucket restored from a backup taken before derive wrote some of them.
        for name in ("thumbnail", "avif:32", "webp:256"):
            (tmp_path / first.keys[name]).unlink()
        storage.heads = 0
        again = await service.derive(persisted)
        # One look at each object the record lists, and the PNG's before it is read.
        assert storage.heads == len(files) + 1
    assert again == first
    for name, data in files.items():
        assert (tmp_path / first.keys[name]).read_bytes() == data, name


async def test_lost_derivatives_of_a_lost_image_are_not_remade_and_the_record_answers(
    tmp_path: Path,
) -> None:
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-gone"))
        first = await service.derive(persisted)
        for key in (first.keys["avif:32"], first.key):
            (tmp_path / key).unlink()
        assert await service.derive(persisted) == first  # the reply stays the same event
    assert not (tmp_path / first.keys["avif:32"]).exists()


async def test_two_replicas_at_once_give_one_record_and_the_same_answer(tmp_path: Path) -> None:
    """Two pods (no shared lock), even configured with different widths: the first writer's."""
    async with (
        ImageGenService(settings(tmp_path, [32])) as one,
        ImageGenService(settings(tmp_path, [64])) as two,
    ):
        persisted = await one.persist(await stored(one, "d-3"))
        first, second = await asyncio.gather(one.derive(persisted), two.derive(persisted))
        third = await two.derive(persisted)
    assert first == second == third
    record = json.loads((tmp_path / first.keys["record"]).read_text())
    assert record["derived"] == first.model_dump(mode="json")
    for key in first.keys.values():
        assert (tmp_path / key).is_file()


async def test_a_pod_that_died_before_the_record_leaves_work_a_retry_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-4"))
        await _dies_before_the_record(service, persisted, monkeypatch)
        assert not (tmp_path / "2026/11/24/d-4.derivatives.json").exists()
        assert (tmp_path / "2026/11/24/d-4.w32.avif").is_file()
        derived = await service.derive(persisted)
    assert (tmp_path / derived.keys["record"]).is_file()
    assert set(derived.keys) == {
        "record",
        "thumbnail",
        "avif:32",
        "webp:32",
        "avif:256",
        "webp:256",
    }


async def test_only_the_stored_images_own_event_is_derived(tmp_path: Path) -> None:
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-5"))
        unpersisted = await stored(service, "d-6")
        cases: list[tuple[PersistedImage, list[str]]] = [
            # Someone who knows the generation id but not its image.
            (persisted.model_copy(update={"sha256": "1" * 64}), ["sha256"]),
            (persisted.model_copy(update={"prompt": "anything", "seed": 8}), ["seed", "prompt"]),
            # A key outside the generation, or an image persist has not finalised.
            (persisted.model_copy(update={"key": "2026/11/24/d-6.png"}), ["key"]),
            (persisted.model_copy(update={"key": "2026/02/31/d-5.png"}), ["key"]),
            (
                persisted.model_copy(
                    update={"generation_id": "d-6", "key": unpersisted.key, "sha256": "2" * 64}
                ),
                ["key"],
            ),
        ]
        for event, fields in cases:
            with pytest.raises(InvalidRequest) as caught:
                await service.derive(event)
            assert caught.value.fields == fields, event
    assert not list(tmp_path.rglob("*.derivatives.json"))
    assert not list(tmp_path.rglob("*.avif"))


def _recorded_without_reading_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """persist as it was before it read the PNG's header: records it wrote may describe bytes
    that are no PNG of their size, and derive must still refuse them."""
    monkeypatch.setattr("imagegen.persist._png_size", lambda png, described: described)


@pytest.mark.parametrize("kind", ["cut short", "not a PNG"])
async def test_a_stored_image_that_does_not_decode_fails_the_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Bytes a record describes that derive cannot decode fail alike at every delivery: a 400
    naming the image (the function answers generation.failed), not a 500 that Knative retries
    until it dead-letters the event."""
    data = {"cut short": png(256, 256)[:200], "not a PNG": b"GIF89a" + b"\0" * 64}[kind]
    _recorded_without_reading_the_header(monkeypatch)
    async with ImageGenService(settings(tmp_path, [32])) as service:
        rendered = await stored(service, "undecodable")
        await service.storage.put(rendered.key, data, content_type="image/png")
        claim = rendered.model_copy(
            update={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        )
        persisted = await service.persist(claim)
        with pytest.raises(InvalidRequest) as caught:
            await service.derive(persisted)
    assert caught.value.fields == ["image"]


async def test_a_record_of_a_png_larger_than_any_render_makes_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record written before persist bounded an image's bytes may describe a PNG of few
    pixels and hundreds of MiB (a huge ancillary chunk): derive read and decoded it whole, and
    the pod was killed at every delivery. The record's size, the stored object's, refuses it
    before anything is read: a 400 naming ``size``."""
    base = png(256, 256)
    body = bytes(MAX_PNG_BYTES + 1 - len(base) - 12)
    chunk = (
        struct.pack(">I", len(body))
        + b"prIv"
        + body
        + struct.pack(">I", zlib.crc32(b"prIv" + body))
    )
    data = base[:-12] + chunk + base[-12:]  # before IEND, the last 12 bytes
    async with ImageGenService(settings(tmp_path, [32])) as service:
        rendered = await store_rendered(service.storage, "chunky", NOW, data, "a kite")
        with monkeypatch.context() as before:  # persist as it was: no bound on the bytes
            before.setattr("imagegen.persist.MAX_PNG_BYTES", 2**63 - 1)
            persisted = await service.persist(rendered)
        read = reads_of(service.storage, monkeypatch)
        for _ in range(2):
            with pytest.raises(InvalidRequest) as caught:
                await service.derive(persisted)
            assert caught.value.fields == ["size"]
    assert persisted.key not in read
    assert not list(tmp_path.rglob("*.webp")) and not list(tmp_path.rglob("*.derivatives.json"))


def test_avif_bytes_do_not_depend_on_the_cpus_the_process_may_use() -> None:
    """libavif's output depends on its thread count, which Pillow takes from the CPUs the
    process may use (a pod pinned to one core, a replica on a larger node): derive encodes on
    one thread, so every replica writes the same derivative."""
    from imagegen.derivatives import make_derivative

    noise = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    cpus = os.sched_getaffinity(0)

    def encoded() -> tuple[bytes, bytes]:
        out = io.BytesIO()
        image.save(out, format="AVIF", quality=60, speed=8)  # Pillow's default threads
        return make_derivative(image, "2026/11/24/t.png", "avif", 512).data, out.getvalue()

    try:
        os.sched_setaffinity(0, {min(cpus)})
        pinned, pinned_default = encoded()
    finally:
        os.sched_setaffinity(0, cpus)
    everywhere, everywhere_default = encoded()
    assert pinned == everywhere
    if len(cpus) > 1:  # the property the setting exists for: threads change the bytes
        assert pinned_default != everywhere_default


def _sized_png(width: int, height: int) -> bytes:
    """A PNG of any size in a few bytes (one bit a pixel, all black)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "fields"),
    [
        ((16384, 16), ["width", "height"]),  # wider than WebP takes
        ((512, 256), ["width"]),
        ((2048, 2048), ["width", "height"]),  # render's largest, but not this image's size
        # A decompression bomb: a few kilobytes, 243 MB once decoded as RGB.
        ((9000, 9000), ["width", "height"]),
    ],
)
async def test_a_stored_image_not_of_its_records_size_is_refused_before_it_is_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int], fields: list[str]
) -> None:
    """The PNG's header must give the record's size, or derive answers a 400 naming what
    differs, having decoded nothing."""
    data = _sized_png(*size)
    _recorded_without_reading_the_header(monkeypatch)
    async with ImageGenService(settings(tmp_path, [32])) as service:
        rendered = await store_rendered(
            service.storage, "misdescribed", NOW, data, "a kite", job_size=(256, 256)
        )
        persisted = await service.persist(rendered)

        def refuse(*args: Any) -> None:
            raise AssertionError("decoded")

        monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)
        with pytest.raises(InvalidRequest) as caught:
            await service.derive(persisted)
    assert caught.value.fields == fields
    assert str(size[0]) not in caught.value.message  # what is stored is not told
    assert not list(tmp_path.rglob("*.webp")) and not list(tmp_path.rglob("*.derivatives.json"))


def test_the_decoded_size_covers_every_image_render_can_make() -> None:
    """The pixel bound was measured against a derive pod's memory for render's largest image;
    a larger render size must come with a new measurement (``MAX_PIXELS``)."""
    from imagegen.derivatives import MAX_PIXELS

    sides = PersistedImage.model_json_schema()["properties"]
    assert sides["width"]["maximum"] * sides["height"]["maximum"] <= MAX_PIXELS


@pytest.mark.parametrize("size", [(16384, 16), (70000, 1)])
def test_pixels_an_encoder_cannot_take_are_a_400_naming_the_image(size: tuple[int, int]) -> None:
    """libwebp takes at most 16,383 pixels a side (a ValueError from Pillow), libavif refuses
    others (a RuntimeError): the same pixels fail at every delivery, never a 500 retried."""
    from imagegen.derivatives import make_derivatives

    with pytest.raises(InvalidRequest) as caught:
        make_derivatives(Image.new("RGB", size), "2026/11/24/t.png", [])
    assert caught.value.fields == ["image"]


# Records as storage may hand them back: emptied, cut short, or not the record at all.
CORRUPT = {
    "empty": b"",
    "cut short": b'{"derived": {"generation_id": "d-',
    "not UTF-8": b"\xff\xfe{}",
    "not an object": b"[1, 2]",
    "its part missing": b'{"other": {}}',
    "its part invalid": b'{"persisted": {"generation_id": 5}, "derived": {"keys": 5}}',
}


@pytest.mark.parametrize("record", ["metadata", "derivatives"])
@pytest.mark.parametrize("kind", list(CORRUPT))
async def test_a_corrupt_record_is_a_503_naming_it_at_every_delivery(
    tmp_path: Path, record: str, kind: str
) -> None:
    """Records are written once: a corrupt one is never mended by a retry, and a 400 would
    fail the generation over an object an operator can repair. The event waits, retried."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-corrupt"))
        await service.derive(persisted)
        keys = {"metadata": persisted.keys["metadata"], "derivatives": "2026/11/24/d-corrupt"}
        key = keys[record] if record == "metadata" else f"{keys[record]}.derivatives.json"
        (tmp_path / key).write_bytes(CORRUPT[kind])
        for _ in range(2):
            with pytest.raises(DependencyUnavailable) as caught:
                await service.derive(persisted)
            error = caught.value
            assert (error.status, error.retryable) == (503, True)
            assert f"the stored record {key!r} is corrupt" in error.message
            if record == "derivatives":  # derive's own: a retry writes it again
                assert "repair or remove it: the next delivery writes it again" in error.message


async def test_a_corrupt_metadata_record_is_to_be_repaired_not_removed(tmp_path: Path) -> None:
    """derive reads persist's record, and persist's image.rendered was answered long ago: the
    message said to remove it, which turned derive's next delivery into a 400 that failed the
    generation. It says to repair it, and the repair the runbook gives lets derive go on."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        rendered = await stored(service, "d-repair")
        persisted = await service.persist(rendered)
        record = tmp_path / persisted.keys["metadata"]
        record.write_bytes(b'{"persisted": ')
        with pytest.raises(DependencyUnavailable) as caught:
            await service.derive(persisted)
        message = caught.value.message
        assert (caught.value.status, caught.value.retryable) == (503, True)
        assert "repair it (runbook: Repair a corrupt record)" in message
        assert "generation's image.rendered event is sent again" in message
        assert "repair or remove it" not in message

        record.unlink()  # what the message must not advise: the event then fails for good
        with pytest.raises(InvalidRequest) as removed:
            await service.derive(persisted)
        assert (removed.value.status, removed.value.fields) == (400, ["key"])

        # Written again from the image.persisted and image.rendered events' data.
        events = {
            "persisted": persisted.model_dump(mode="json"),
            "request": rendered.model_dump(mode="json")["prompt"],
        }
        record.write_text(json.dumps(events))
        derived = await service.derive(persisted)
    assert (derived.key, derived.sha256) == (persisted.key, persisted.sha256)


def test_the_derive_function_answers_a_corrupt_record_with_a_503_and_no_trace(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"

    async def persisted() -> PersistedImage:
        async with ImageGenService(settings(store, [32])) as service:
            return await service.persist(await stored(service, "d-http"))

    event = asyncio.run(persisted())
    (store / "2026/11/24/d-http.derivatives.json").write_bytes(b"")
    with InProcessFunction("derive", base_env(store)) as derive:
        reply = post_event(derive, IMAGE_PERSISTED, event.model_dump(mode="json"))
    assert reply.status_code == 503, reply.text
    assert "Retry-After" in reply.headers
    body = reply.json()
    assert body["error"] == "dependency_unavailable"
    assert "'2026/11/24/d-http.derivatives.json' is corrupt" in body["message"]
    assert "Traceback" not in reply.text


async def test_a_lost_thumbnail_is_remade_at_its_first_writers_size(tmp_path: Path) -> None:
    """The record keeps the thumbnail's size: a redelivery to a replica configured otherwise
    (a rollout that changed ``IMAGEGEN_THUMBNAIL_SIZE``) remade it at its own, other bytes
    under the same key. A record written before the size was kept remakes it at the setting."""
    first_settings = Settings(storage_url=str(tmp_path), thumbnail_size=256, derivative_widths=[])
    other_settings = Settings(storage_url=str(tmp_path), thumbnail_size=128, derivative_widths=[])
    async with ImageGenService(first_settings) as one:
        rendered = await store_rendered(one.storage, "d-thumb", NOW, png(512, 512), "a kite")
        persisted = await one.persist(rendered)
        first = await one.derive(persisted)
    assert first.thumbnail_size == 256
    thumbnail = tmp_path / first.keys["thumbnail"]
    made = thumbnail.read_bytes()
    thumbnail.unlink()  # a bucket restored without it
    async with ImageGenService(other_settings) as two:
        assert await two.derive(persisted) == first
        assert thumbnail.read_bytes() == made

        # A record from before: without the size, the current setting is all there is.
        record = tmp_path / first.keys["record"]
        old = json.loads(record.read_text())
        del old["derived"]["thumbnail_size"]
        record.write_text(json.dumps(old))
        thumbnail.unlink()
        again = await two.derive(persisted)
    assert again.thumbnail_size is None and again.keys == first.keys
    with Image.open(thumbnail) as remade:
        assert remade.size == (128, 128)


async def _dies_before_the_record(
    service: ImageGenService, persisted: PersistedImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``service`` derives ``persisted`` and dies before its record: its objects are stored."""
    real_create = LocalStorage.create

    async def dies_at_the_record(self: LocalStorage, key: str, *args: Any, **kw: Any) -> bool:
        if key.endswith(".derivatives.json"):
            raise ConnectionResetError("the pod is gone")
        return await real_create(self, key, *args, **kw)

    monkeypatch.setattr(LocalStorage, "create", dies_at_the_record)
    with pytest.raises(ConnectionResetError):
        await service.derive(persisted)
    monkeypatch.setattr(LocalStorage, "create", real_create)


def _sized(root: Path, thumbnail_size: int) -> Settings:
    return Settings(storage_url=str(root), thumbnail_size=thumbnail_size, derivative_widths=[])


async def test_a_thumbnail_an_earlier_writer_stored_is_recorded_at_its_own_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica (thumbnails of 256) stored the thumbnail and died before the record; the
    redelivery went to one configured otherwise (128), whose create lost to that thumbnail:
    its record said 128 of a 256 px thumbnail, and one lost was remade at 128 under its key."""
    async with ImageGenService(_sized(tmp_path, 256)) as one:
        rendered = await store_rendered(one.storage, "d-thumb-race", NOW, png(512, 256), "a kite")
        persisted = await one.persist(rendered)
        await _dies_before_the_record(one, persisted, monkeypatch)
    thumbnail = tmp_path / persisted.keys["thumbnail"]
    made = thumbnail.read_bytes()
    with Image.open(thumbnail) as stored:
        assert stored.size == (256, 128)

    async with ImageGenService(_sized(tmp_path, 128)) as two:
        derived = await two.derive(persisted)
        assert derived.thumbnail_size == 256  # the stored thumbnail's, not this replica's
        record = json.loads((tmp_path / derived.keys["record"]).read_text())
        assert record["derived"]["thumbnail_size"] == 256
        thumbnail.unlink()  # a bucket restored without it
        assert await two.derive(persisted) == derived
    assert thumbnail.read_bytes() == made


async def test_a_stored_thumbnail_of_the_same_pixels_keeps_this_replicas_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image smaller than either size has one thumbnail, itself, whichever size made it."""
    async with ImageGenService(_sized(tmp_path, 512)) as one:
        rendered = await store_rendered(one.storage, "d-thumb-same", NOW, png(256, 256), "a kite")
        persisted = await one.persist(rendered)
        await _dies_before_the_record(one, persisted, monkeypatch)
    async with ImageGenService(_sized(tmp_path, 384)) as two:
        derived = await two.derive(persisted)
    assert derived.thumbnail_size == 384


def _webp_header_of(width: int, height: int) -> bytes:
    """A lossless WebP of a few dozen bytes whose header says ``width`` x ``height``: its
    VP8L header (after the signature byte 0x2f, at byte 20 of the file) holds width - 1 and
    height - 1 in 14 bits each, least significant first (RFC 9649, 3.2)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(out, format="WEBP", lossless=True)
    data = bytearray(out.getvalue())
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    (bits,) = struct.unpack_from("<I", data, 21)
    bits = bits & ~((1 << 28) - 1) | (width - 1) | (height - 1) << 14
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


@pytest.mark.parametrize(
    "size",
    [(14000, 14000), (10000, 10000)],
    ids=["over twice Pillow's limit", "over Pillow's limit"],
)
async def test_a_stored_thumbnail_over_pillows_pixel_limit_is_recorded_at_this_replicas_size(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    size: tuple[int, int],
) -> None:
    """A thumbnail stored before the record whose header is over Pillow's pixel limit (no
    thumbnail derive makes): Pillow's DecompressionBombError was a 500 at every delivery, and
    its warning, under twice the limit, had the header's longer side recorded. It is a stored
    thumbnail that cannot be read, recorded at this replica's size and logged."""
    async with ImageGenService(_sized(tmp_path, 256)) as one:
        rendered = await store_rendered(one.storage, "d-thumb-bomb", NOW, png(256, 256), "a kite")
        persisted = await one.persist(rendered)
        await _dies_before_the_record(one, persisted, monkeypatch)
    (tmp_path / persisted.keys["thumbnail"]).write_bytes(_webp_header_of(*size))
    async with ImageGenService(_sized(tmp_path, 256)) as two:
        with caplog.at_level("WARNING", logger="imagegen.derive"):
            derived = await two.derive(persisted)
            assert await two.derive(persisted) == derived
    assert derived.thumbnail_size == 256
    warned = [r for r in caplog.records if "stored thumbnail that cannot be read" in r.message]
    assert len(warned) == 1 and "DecompressionBomb" in warned[0].__dict__["reason"]


async def test_record_entries_derive_never_writes_are_logged_and_not_remade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A record edited by hand to list a derivative derive never writes: a width of Unicode
    digits was a ValueError, a width far over the image's encoded at that width (30000 took
    gigabytes) before its key was compared. Each such entry is logged and left alone; the
    record is answered, and what derive does write is still remade."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-edited"))
        first = await service.derive(persisted)
        base = first.keys["avif:32"].removesuffix(".w32.avif")
        foreign = {
            "avif:\u00b2": f"{base}.w2.avif",  # a superscript two: str.isdigit() takes it
            "avif:512": f"{base}.w512.avif",  # wider than the 256 px image
            "webp:8": f"{base}.w8.webp",  # narrower than IMAGEGEN_DERIVATIVE_WIDTHS allows
            "avif:64": f"{base}.w65.avif",  # not the key of its width
            "thumbnail": f"{base}.w16.webp",  # not the thumbnail's key
        }
        record = tmp_path / first.keys["record"]
        body = json.loads(record.read_text())
        body["derived"]["keys"].update(foreign)
        record.write_text(json.dumps(body))
        (tmp_path / first.keys["webp:32"]).unlink()
        widths: list[int] = []
        make = imagegen.derive.make_derivative

        def counted(pixels: Image.Image, key: str, fmt: str, width: int) -> Any:
            widths.append(width)
            return make(pixels, key, fmt, width)

        monkeypatch.setattr("imagegen.derive.make_derivative", counted)
        with caplog.at_level("WARNING", logger="imagegen.derive"):
            again = await service.derive(persisted)
    assert again.keys == {**first.keys, **foreign}
    assert widths == [32]  # the lost webp:32 alone
    assert (tmp_path / first.keys["webp:32"]).is_file()
    assert not any((tmp_path / key).exists() for key in foreign.values())
    logged = [r for r in caplog.records if "does not write" in r.message]
    assert len(logged) == 1 and logged[0].__dict__["names"] == sorted(foreign)


async def test_an_image_read_cut_short_is_a_retryable_503_not_a_failed_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer bytes read than the record says the image holds is a download cut short, not
    another image: a 503, retried, where derive failed the generation for good ("does not
    match its record"). The next delivery reads it whole and derives it."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-short"))
        get = service.storage.get

        async def cut_short(key: str) -> bytes:
            data = await get(key)
            return data[: len(data) // 2] if key == persisted.key else data

        monkeypatch.setattr(service.storage, "get", cut_short)
        with pytest.raises(DependencyUnavailable) as caught:
            await service.derive(persisted)
        assert caught.value.status == 503 and caught.value.retry_after
        assert persisted.key in caught.value.message
        assert not list(tmp_path.rglob("*.derivatives.json"))

        monkeypatch.setattr(service.storage, "get", get)
        derived = await service.derive(persisted)
    assert (tmp_path / derived.keys["avif:32"]).exists()


@pytest.mark.parametrize("change", ["shorter", "larger"])
async def test_a_stored_object_not_of_its_records_size_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """An object replaced since persist (an operator's copy, a restore gone wrong) may be of
    any size, and ``get`` reads it whole: one a few hundred MiB long was read into the pod at
    every delivery, and any size but the record's was called a read cut short, a 503 retried
    for ever. Storage's HEAD refuses it unread: a 400 naming ``size``, at every delivery."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-resized"))
        original = (tmp_path / persisted.key).read_bytes()
        data = original[:1000] if change == "shorter" else original + bytes(4 << 20)
        (tmp_path / persisted.key).write_bytes(data)
        read = reads_of(service.storage, monkeypatch)
        for _ in range(2):
            with pytest.raises(InvalidRequest) as caught:
                await service.derive(persisted)
            assert caught.value.fields == ["size"]
            assert caught.value.status == 400
            assert f"{len(data):,}" not in caught.value.message  # what is stored is not told
    assert persisted.key not in read
    assert not list(tmp_path.rglob("*.webp")) and not list(tmp_path.rglob("*.derivatives.json"))


async def test_lost_derivatives_of_an_image_stored_shorter_are_not_remade_and_the_record_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A redelivery that finds a derivative lost and the PNG cut short in storage (a restore
    gone wrong) cannot remake it: that is logged and the record answered, as for a PNG lost,
    where every redelivery was a 503 for ever (the stored size taken for a read cut short)."""
    async with ImageGenService(settings(tmp_path, [32])) as service:
        persisted = await service.persist(await stored(service, "d-shorter"))
        first = await service.derive(persisted)
        (tmp_path / first.keys["avif:32"]).unlink()
        image = tmp_path / first.key
        image.write_bytes(image.read_bytes()[:1000])
        with caplog.at_level("WARNING", logger="imagegen.derive"):
            assert await service.derive(persisted) == first
    assert any("not remade" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / first.keys["avif:32"]).exists()


async def test_a_delivery_that_timed_out_leaves_its_encode_to_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encode runs in a thread, which a delivery's timeout cannot stop: its retry waited for
    the lock, not the encode, and started another beside it, one more at every timeout. The
    retry waits for the encode running; objects and record are written once."""
    encodes: list[str] = []
    release = threading.Event()
    encode = imagegen.derive._encode

    def slow_encode(*args: Any) -> Any:
        encodes.append("started")
        release.wait(30)
        return encode(*args)

    monkeypatch.setattr("imagegen.derive._encode", slow_encode)
    storage = LocalStorage(tmp_path)
    created: list[str] = []
    create = storage.create

    async def counted(key: str, *args: Any, **kw: Any) -> bool:
        created.append(key)
        return await create(key, *args, **kw)

    monkeypatch.setattr(storage, "create", counted)
    async with ImageGenService(settings(tmp_path, [32]), storage=storage) as service:
        persisted = await service.persist(await stored(service, "d-timeout"))
        created.clear()
        try:
            for _ in range(3):  # the first delivery and two retries, each timed out
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(service.derive(persisted), 0.3)
            assert encodes == ["started"]
            retry = asyncio.ensure_future(service.derive(persisted))
            await asyncio.sleep(0.1)
        finally:
            release.set()
        derived = await retry
        assert await service.derive(persisted) == derived
        assert service.derive_stage._running == {}  # nothing kept once it ended
    assert encodes == ["started"]
    assert sorted(created) == sorted(k for n, k in derived.keys.items())
    assert (tmp_path / derived.keys["record"]).is_file()
