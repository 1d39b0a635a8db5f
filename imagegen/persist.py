"""The persist stage: the metadata record and public URLs of a rendered image."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from PIL import Image, ImageFile
from pydantic import BaseModel, ValidationError

from imagegen._locks import KeyedLocks
from imagegen.errors import DependencyUnavailable, InvalidRequest, NotFound
from imagegen.identity import stage_time
from imagegen.models import MAX_PNG_BYTES, EnhancedPrompt, PersistedImage, RenderedImage
from imagegen.png import pixel_data_fault, unreadable_chunk, unshowable
from imagegen.render import stored_png
from imagegen.settings import Settings
from imagegen.storage.base import GenerationKeys, Storage, StoredObject
from imagegen.telemetry import answered_again
from imagegen.urls import public_url
from imagegen.validation import field_errors

__all__ = [
    "PersistStage",
    "check_png_bytes",
    "claim_image",
    "corrupt_record",
    "load_record",
    "record_part",
]

log = logging.getLogger("imagegen.persist")

M = TypeVar("M", bound=BaseModel)


async def claim_image(
    storage: Storage,
    key: str,
    sha256: str,
    *,
    size: int,
    described_by: str,
    head: bool = False,
) -> bytes:
    """The PNG an event's claim check points at, once shown to be the one it describes.

    Args:
        size: The image's size in bytes: one larger than any render makes is refused before
            anything is read. Storage's own (from the caller's ``HEAD``) unless ``head``.
        head: ``size`` is a record's, not storage's: the object's ``HEAD`` is asked for
            first, and an object of another size is refused unread (an object replaced since
            its record was written may be of any size, and ``get`` reads it whole).

    Raises:
        DependencyUnavailable: fewer (or more) bytes were read than storage gave as the
            object's size before the read: a read cut short (or an object replaced while it
            was read) is a storage fault, retried, not an image that differs from its event.
        InvalidRequest: ``size`` is over :data:`~imagegen.models.MAX_PNG_BYTES` (field
            ``size``), nothing is stored under ``key`` (field ``key``), the stored object is
            not of ``size`` bytes (field ``size``: only with ``head``), or what is stored has
            another digest (field ``sha256``). A claim check that points at nothing is a bad
            event, not a reason to retry: Knative would retry a 404.
    """
    check_png_bytes(key, size)
    if head:
        stored = await storage.head(key)
        if stored is None:
            raise _missing(key)
        if stored.size != size:
            # The same object is of the same size at every delivery: not worth a retry.
            raise InvalidRequest(
                f"stored image {key!r} is not of the size {described_by} gives",
                # Not the stored size: knowing an id is not enough to learn what is stored.
                errors=[{"field": "size", "message": "not the stored image's size"}],
            )
    try:
        png = await storage.get(key)
    except NotFound:
        raise _missing(key) from None
    if len(png) != size:
        # Storage gave the object's size just before: fewer bytes is a download cut short (a
        # reset, a proxy that truncates), not another image: its digest would differ and fail
        # the generation for good. The next delivery reads it again.
        raise DependencyUnavailable(
            f"image {key!r} was read as {len(png):,} bytes where storage gave its size as"
            f" {size:,} just before: the read was cut short, or the object replaced meanwhile",
            retry_after=5,
        )
    digest = hashlib.sha256(png).hexdigest()
    if digest != sha256:
        raise InvalidRequest(
            f"stored image {key!r} does not match {described_by}",
            # Not the stored digest: knowing an id is not enough to learn what is stored.
            errors=[{"field": "sha256", "message": "not the stored image's digest"}],
        )
    return png


def check_png_bytes(key: str, size: int) -> None:
    """Refuses the object under ``key`` unread when its ``size`` is more than a PNG of render's
    can take (:data:`~imagegen.models.MAX_PNG_BYTES`): a PNG large in bytes but not in pixels
    (a huge ancillary chunk) passed the pixel checks, and was read whole into a pod of 1 GiB at
    every delivery, which killed it.

    Raises:
        InvalidRequest: naming ``size`` (a 400: the same bytes are as large at every delivery).
    """
    if size > MAX_PNG_BYTES:
        raise InvalidRequest(
            f"image {key!r} is larger than any render makes ({MAX_PNG_BYTES:,} bytes at most)",
            errors=[{"field": "size", "message": "larger than any render makes"}],
        )


def _missing(key: str) -> InvalidRequest:
    return InvalidRequest(
        f"image {key!r} is not in storage",
        errors=[{"field": "key", "message": "no stored image under this key"}],
    )


def load_record(key: str, body: bytes, *, written_from: str | None = None) -> dict[str, Any]:
    """The JSON object of the record stored under ``key`` (a metadata or derivatives record).

    Args:
        written_from: As for :func:`corrupt_record`.

    Raises:
        DependencyUnavailable: the record is corrupt (:func:`corrupt_record`).
    """
    try:
        record = json.loads(body)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8
        why = f"not JSON: {type(exc).__name__}"
        raise corrupt_record(key, why, written_from=written_from) from None
    if not isinstance(record, dict):
        raise corrupt_record(key, "not a JSON object", written_from=written_from)
    return record


def record_part(
    key: str,
    record: Mapping[str, Any],
    part: str,
    model: type[M],
    *,
    written_from: str | None = None,
) -> M:
    """``record[part]`` of the record stored under ``key``, as ``model``; fields ``model``
    does not know, in it or in any object it holds, are left out.

    A record may have been written by a newer release, one rollout ahead of this one, whose
    models have a field more (an optional one, whose default means "as before"): the record is
    still the generation's, and read as the prompt memo is (:mod:`imagegen.enhance.memo`).
    Called corrupt, it would be a 503 at every delivery, with advice to remove a valid record.
    Events are read strictly all the same: a field unknown there is a 400 naming it.

    Args:
        written_from: As for :func:`corrupt_record`.

    Raises:
        DependencyUnavailable: the part is missing, or is not a valid ``model``: not an object,
            a required field missing, a value of the wrong type or out of range
            (:func:`corrupt_record`).
    """
    if part not in record:
        raise corrupt_record(key, f"no {part!r}", written_from=written_from)
    try:
        return model.model_validate(record[part], extra="ignore")
    except ValidationError as exc:
        fields = ", ".join(dict.fromkeys(e["field"] for e in field_errors(exc))) or "its shape"
        why = f"{part!r} is no valid {model.__name__}: {fields}"
        raise corrupt_record(key, why, written_from=written_from) from None


def corrupt_record(key: str, why: str, *, written_from: str | None = None) -> DependencyUnavailable:
    """The error for a stored record that cannot be read (empty, cut short, not ours).

    A 503, retried, rather than a 400 or a 500. The event is fine and the store answers: what
    is wrong is one object, which an operator must repair or remove. Records are written once,
    first writer wins, so no delivery can overwrite or mend it; but a 400 would fail the
    generation for good over an object that can be repaired. Nor may it count as missing:
    derive refuses an image without a metadata record as not persisted (a 400), and a writer
    that took it for absent would find its create refused by the very object it cannot read.
    Retried while its Trigger retries (neither broker reads the ``Retry-After``); past them
    the event is dead-lettered, to be sent again once the record is repaired
    (``docs/runbook.md``, "Repair a corrupt record").

    Args:
        written_from: None when the event being answered is the one that writes the record:
            removed, it is written again at the next delivery, a new record (persist's with a
            new ``persisted_at`` and newly signed URLs, beside a ledger that keeps the first
            ones: the runbook restores the earlier record instead). Else the type of the
            event that does (``image.rendered`` for the metadata record derive reads): that
            event was answered long ago, so removing the record only turns the next
            delivery into a 400 ("no record"), and the message says to repair it, or to send
            that event again once it is removed (``docs/runbook.md``, "Repair a corrupt
            record").
    """
    if written_from is None:
        remedy = "repair or remove it: the next delivery writes it again"
    else:
        remedy = (
            f"repair it (runbook: Repair a corrupt record); removed, it is written again only"
            f" when its generation's {written_from} event is sent again"
        )
    return DependencyUnavailable(
        f"the stored record {key!r} is corrupt ({why[:200]}): it is written once, so no"
        f" retry mends it; {remedy}",
        retry_after=60,
    )


class PersistStage:
    """Finalises a rendered image: JSON record, public URLs.

    The thumbnail and the AVIF/WebP derivatives are not made here but by the derive stage,
    from this stage's ``image.persisted`` (:mod:`imagegen.derive`): encoding them is most of
    the work, and the image is final, and served as a PNG, without them. The record and the
    reply name the thumbnail's key and URL all the same: they follow from the generation.

    Idempotent across replicas: the record is written only if absent (first writer wins), and
    everything in it is a function of the ``image.rendered`` event, ``created_at`` included, but
    ``persisted_at`` and the signed URLs' expiry, from its first writer's clock (never before
    ``created_at``). A redelivered event, or one handled by two replicas at once, gets the
    stored record as its answer, once the event is shown to describe that record, by the rule
    its first delivery was held to.
    """

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self._generation_lock = KeyedLocks()

    async def run(self, image: RenderedImage) -> PersistedImage:
        keys = GenerationKeys(image.generation_id, image.prompt.requested_at)
        if image.key != keys.image:
            raise InvalidRequest(
                f"key {image.key!r} does not belong to generation {image.generation_id!r}",
                errors=[{"field": "key", "message": f"expected {keys.image!r}"}],
            )

        # Deliveries of one image in flight at once in this process finalise it once.
        async with self._generation_lock(image.generation_id):
            return await self._finalise(image, keys)

    async def _finalise(self, image: RenderedImage, keys: GenerationKeys) -> PersistedImage:
        # 1. An existing record means this image is already finalised. The image's head is
        # asked for at the same time: a first delivery needs it next, so it costs no round
        # trip of its own (a redelivery's goes unused).
        existing, stored = await asyncio.gather(
            self._stored_answer(image, keys), self.storage.head(keys.image)
        )
        if existing is not None:
            log.info("image already persisted", extra={"generation_id": image.generation_id})
            answered_again()
            return existing

        # 2. Check what the event says of the object before reading it: one of another size
        # than the event's, or larger than any render makes (render's PNGs are a few MiB, a
        # pod has 1 GiB), is never downloaded.
        if stored is None:
            raise _missing(keys.image)
        location = self.storage.location(keys.image)
        if stored.size != image.size:
            # Names size, and all else wrong.
            self._check_rendered(image, location, stored, stored.size)
        check_png_bytes(keys.image, stored.size)

        # 3. Claim the image and check that the event says of it what render said, and that
        # it is a PNG of the size the event gives: derive would fail it for good otherwise,
        # and the Worker serve it as a PNG.
        png = await claim_image(
            self.storage, keys.image, image.sha256, size=stored.size, described_by="the event"
        )
        # CPU-bound (its chunks walked and inflated): off the loop, so one PNG does not hold
        # up the requests beside it.
        dimensions = await asyncio.to_thread(_png_size, png, (image.width, image.height))
        self._check_rendered(image, location, stored, len(png), dimensions)

        # 4. Public URLs and the record, written last: its presence marks the image final.
        persisted = self._describe(image, keys)
        record = {
            "persisted": persisted.model_dump(mode="json"),
            "request": image.prompt.model_dump(mode="json"),
        }
        body = json.dumps(record, indent=2).encode()
        if await self._create(keys.metadata, body, "application/json"):
            return persisted
        # Another replica wrote the record first: answer with it, as it would.
        existing = await self._stored_answer(image, keys)
        if existing is None:
            raise DependencyUnavailable(
                f"the record {keys.metadata!r} was written but cannot be read yet", retry_after=1
            )
        answered_again()
        return existing

    def _describe(self, image: RenderedImage, keys: GenerationKeys) -> PersistedImage:
        """The record of ``image``: a function of the event alone, whichever replica writes it,
        but for ``persisted_at`` and the signed URLs' expiry, which count from now (a replica
        that loses the race answers the stored record)."""
        # In UTC, as every stage time: the same image is told alike however its first
        # delivery wrote the time (+05:30, Z), in the record, the reply and its event's time.
        created_at = (image.rendered_at or image.prompt.requested_at).astimezone(UTC)
        persisted_at = _not_before(stage_time(), created_at, image.generation_id)
        # Signed URLs last their TTL from when the record is written, not from the render: an
        # event persisted late (a dead letter delivered again a week on) gets URLs that work.
        signed_at = int(persisted_at.timestamp())
        candidates = {"image": keys.image, "thumbnail": keys.thumbnail}
        urls = {
            name: url
            for name, key in candidates.items()
            if (url := self._url(key, signed_at)) is not None
        }
        return PersistedImage(
            generation_id=image.generation_id,
            key=keys.image,
            location=self.storage.location(keys.image),
            url=urls.get("image"),
            keys={
                "image": keys.image,
                "thumbnail": keys.thumbnail,
                "metadata": keys.metadata,
            },
            urls=urls,
            metadata_location=self.storage.location(keys.metadata),
            size=image.size,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            seed=image.seed,
            model=image.model,
            prompt=image.prompt.prompt,
            timings=image.timings,
            created_at=created_at,
            persisted_at=persisted_at,
            replay_of=image.prompt.replay_of,
        )

    async def _stored_answer(
        self, image: RenderedImage, keys: GenerationKeys
    ) -> PersistedImage | None:
        """The stored record's answer, once the event is shown to describe it; None if none.

        Raises:
            InvalidRequest: the event names this generation but not its image or job. Checked
                before anything of the record is returned, so knowing a generation id is not
                enough to read its record (a 400, not a 409 that Knative would retry).
            DependencyUnavailable: the stored record is corrupt (:func:`corrupt_record`).
        """
        if await self.storage.head(keys.metadata) is None:
            return None
        record = load_record(keys.metadata, await self.storage.get(keys.metadata))
        stored = record_part(keys.metadata, record, "persisted", PersistedImage)
        job = record_part(keys.metadata, record, "request", EnhancedPrompt)
        recorded = {
            **stored.model_dump(include=_RECORDED),
            "steps": job.steps,
            "guidance": job.guidance,
            "rendered_at": stored.created_at,
        }
        errors = _differences(image, recorded)
        # The job by the rule its first delivery was held to (stored_png.matches): when
        # enhance wrote it, or how its JSON was written, is no part of it. Compared whole, a
        # first delivery that said another enhanced_at than render's was recorded, and
        # render's own event refused afterwards.
        if stored_png.canonical_fingerprint(image.prompt) != stored_png.canonical_fingerprint(job):
            errors.append({"field": "prompt", "message": _MESSAGES["prompt"]})
        _refuse(image, errors)
        return stored

    @staticmethod
    def _check_rendered(
        image: RenderedImage,
        location: str,
        stored: StoredObject | None,
        size: int,
        dimensions: tuple[int, int] | str | None = None,
    ) -> None:
        """Refuse ``image`` unless it is render's own reply for the PNG of ``size`` bytes.

        Render's reply is a function of its job and of what it stored with the PNG: the job's
        digest, the timings and the time (:mod:`imagegen.render.stored_png`). So the job is
        checked against that digest, and every other field against the reply which that job
        and the stored object make. An object stored without render's metadata has only its
        bytes and the job to check against.

        Args:
            location: Where this stage's storage keeps the image (``Storage.location``), which
                render's reply says, as render stores where this stage reads: an event that
                names another place (another bucket, a ``file://`` path) is not render's.
            dimensions: The stored PNG's (width, height) from its header (:func:`_png_size`),
                or why it has none; None when its bytes have not been read.

        Raises:
            InvalidRequest: naming each field of the event that differs, and ``image`` when
                the stored object is no PNG (a 400: never a 409, which Knative would retry).
        """
        expected = stored_png.rendered_image(
            image.prompt,
            image.key,
            location,
            size=size,
            sha256=image.sha256,  # already shown to be the stored bytes' digest
            stage_timings=stored_png.timings(stored) if stored is not None else {},
            at=stored_png.rendered_at(stored) if stored is not None else None,
        )
        errors = _differences(image, _claims(expected))
        if isinstance(dimensions, str):
            errors.append({"field": "image", "message": dimensions})
        elif dimensions is not None:
            header = _differences(image, dict(zip(("width", "height"), dimensions, strict=True)))
            errors += [error for error in header if error not in errors]
        # Either digest render stores: its reply to a retried call written otherwise (the
        # same job, its metadata's keys in another order) carries that call's job.
        if stored is not None and not stored_png.matches(image.prompt, stored):
            errors.append({"field": "prompt", "message": _MESSAGES["prompt"]})
        _refuse(image, errors)

    def _url(self, key: str, signed_at: int) -> str | None:
        base = self.settings.public_base_url
        if not base:
            return None
        secret = self.settings.url_signing_secret
        return public_url(
            base,
            key,
            secret=secret.get_secret_value() if secret else None,
            ttl=self.settings.signed_url_ttl,
            now=signed_at,
        )

    async def _create(self, key: str, data: bytes, content_type: str) -> bool:
        return await self.storage.create(key, data, content_type=content_type)


# What the record keeps of the event under the same name.
_RECORDED = {
    "generation_id",
    "location",
    "sha256",
    "size",
    "width",
    "height",
    "seed",
    "model",
    "timings",
}
_MESSAGES = {
    "prompt": "not the job the image came from",
    "rendered_at": "not when it was stored",
    "location": "not where storage keeps the image",
}


def _not_before(now: datetime, created_at: datetime, generation_id: str) -> datetime:
    """``now``, or ``created_at`` (to the next millisecond, as :func:`stage_time` keeps
    times) when this clock is behind it.

    The record is written after the image it records: a pod whose clock is behind the render's
    wrote a ``persisted_at`` before ``created_at``, and signed URLs that count from it, some
    already expired when they were handed out. Counted from ``created_at``, they last at least
    the TTL from the render.
    """
    if now >= created_at:
        return now
    floor = created_at.replace(microsecond=created_at.microsecond // 1000 * 1000)
    at = floor if floor == created_at else floor + timedelta(milliseconds=1)
    behind = (created_at - now).total_seconds()
    log.warning(
        "this clock is %.3f s behind the image's created_at: persisted_at and the signed URLs'"
        " expiry count from created_at instead",
        behind,
        extra={"generation_id": generation_id, "clock_behind_s": round(behind, 3)},
    )
    return at


def _claims(image: RenderedImage) -> dict[str, object]:
    """What ``image`` says of the stored image, by field; its time as the record keeps it."""
    return {
        **image.model_dump(include=_RECORDED),
        "steps": image.steps,
        "guidance": image.guidance,
        "rendered_at": image.occurred_at,
        "prompt": image.prompt,
    }


def _differences(image: RenderedImage, truth: Mapping[str, object]) -> list[dict[str, str]]:
    """One error for each field where ``image`` says other than ``truth``.

    The messages never say the stored value: knowing a generation id is not enough to read
    what is stored for it.
    """
    claims = _claims(image)
    return [
        {"field": name, "message": _MESSAGES.get(name, f"not the stored image's {name}")}
        for name, value in truth.items()
        if claims[name] != value
    ]


def _png_size(png: bytes, described: tuple[int, int]) -> tuple[int, int] | str:
    """The (width, height) in ``png``'s header, or why it has none; no pixel is decoded.

    A header too large for Pillow to open (a decompression bomb: far over any size render
    makes) is said as such, whether Pillow refuses it or, told to, warns of it as an error;
    so is a PNG that derive cannot show as a browser does
    (:func:`imagegen.png.unshowable`), which it would fail for good, or one not whole
    (:func:`_unfinished`). Those are looked for only in a PNG of the ``described`` size, the
    event's (at most 2048 a side, ``Dimension``): one of any other is refused for its size
    alone, before its pixel data is inflated (a 13000 x 13000 16-bit RGBA header over 1.3 MB
    of deflated zeros inflates to 1.3 GB, a CPU-second). A chunk Pillow cannot read, or text
    and profile chunks past what is inflated of one PNG
    (:func:`imagegen.png.unreadable_chunk`), are said first: Pillow would not open the
    PNG, or derive not load it. CPU-bound: run it off the event loop.
    """
    if (why := unreadable_chunk(png)) is not None:  # or Pillow would not open it
        return why
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as opened:
            size = opened.size
            if size != described:
                return size
            why = unshowable(png, opened) or _unfinished(png, opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "a PNG larger than any render makes"
    except (OSError, SyntaxError, ValueError, EOFError):  # not a PNG, or one cut in its header
        return "not a PNG"
    return why or size


def _unfinished(png: bytes, opened: ImageFile.ImageFile) -> str | None:
    """Why ``png`` (``opened`` by Pillow, not loaded) is not whole, or None.

    Pillow's ``verify()`` walks the chunks from the first IDAT to IEND, each checked to be as
    long as it says and to match its CRC (those before IDAT were when it opened). So a PNG
    cut short anywhere is refused, as is one without IEND or with a chunk damaged (libpng, and
    so a browser, refuses a critical chunk whose CRC is wrong). Then the pixel data is
    inflated, once, never whole in memory, and refused unless it is exactly the image's rows
    (:func:`imagegen.png.pixel_data_fault`, derive's own check): a stream that stops
    early inside whole chunks would be decoded with black rows. No pixel is decoded.
    """
    if not opened.tile:  # no IDAT before IEND
        return "a PNG without pixel data"
    try:
        opened.verify()
    except (OSError, SyntaxError, ValueError, EOFError):
        return "a PNG cut short or damaged"
    return pixel_data_fault(png)


def _refuse(image: RenderedImage, errors: list[dict[str, str]]) -> None:
    if errors:
        raise InvalidRequest(
            f"the event does not describe the image stored for generation {image.generation_id!r}",
            errors=errors,
        )
