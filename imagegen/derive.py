"""The derive stage: thumbnail and AVIF/WebP derivatives of a persisted image; their record."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import warnings
from typing import Any, cast

from PIL import Image
from pydantic import TypeAdapter, ValidationError

from imagegen.derivatives import (
    Derivative,
    decode_pixels,
    derivative_key,
    make_derivative,
    make_derivatives,
    make_thumbnail,
    parse_name,
)
from imagegen.errors import DependencyUnavailable, InvalidRequest, NotFound
from imagegen.models import DerivedImage, PersistedImage
from imagegen.persist import claim_image, load_record, record_part
from imagegen.settings import Settings
from imagegen.storage.base import GenerationKeys, Storage
from imagegen.telemetry import answered_again

__all__ = ["DeriveStage"]

log = logging.getLogger("imagegen.derive")

THUMBNAIL_TYPE = "image/webp"
# The event from which persist writes the metadata record derive reads.
_PERSIST_INPUT = "image.rendered"


def _encode(
    png: bytes, image: PersistedImage, thumbnail_size: int, widths: list[int]
) -> tuple[bytes, list[Derivative]]:
    """The thumbnail and every derivative, from one decode of ``png`` (CPU-bound).

    The PNG is decoded only at the size ``image``'s record gives: persist checked its digest,
    not its pixels, and its header is read before anything is decoded.
    """
    pixels = decode_pixels(png, size=(image.width, image.height))
    return make_thumbnail(pixels, thumbnail_size), make_derivatives(pixels, image.key, widths)


def _remake(
    png: bytes, image: PersistedImage, thumbnail_size: int, lost: dict[str, str]
) -> list[tuple[str, bytes, str]]:
    """(key, bytes, content type) of each lost object a record lists, from one decode.

    ``lost`` maps record names (``thumbnail``, ``avif:512``) to keys, each one derive writes
    (:func:`_written`). Encoding is deterministic, so a derivative is the very file its first
    writer stored. CPU-bound: run it off the loop.
    """
    pixels = decode_pixels(png, size=(image.width, image.height))
    made: list[tuple[str, bytes, str]] = []
    for name, key in lost.items():
        if name == "thumbnail":
            made.append((key, make_thumbnail(pixels, thumbnail_size), THUMBNAIL_TYPE))
        elif (parsed := parse_name(name)) is not None:
            derivative = make_derivative(pixels, image.key, *parsed)
            made.append((key, derivative.data, derivative.content_type))
    return made


# What IMAGEGEN_DERIVATIVE_WIDTHS may hold, as Settings checks it.
_CONFIGURABLE_WIDTHS: TypeAdapter[list[int]] = TypeAdapter(
    cast(Any, Settings.model_fields["derivative_widths"].annotation)
)


def _written(name: str, key: str, image: PersistedImage, keys: GenerationKeys) -> bool:
    """Whether derive writes ``key`` as the record name ``name`` for ``image``, whatever its
    settings: the thumbnail under its own key, or a derivative under the key of its format and
    width (:func:`~imagegen.derivatives.derivative_key`), at the image's own width or at a
    narrower one that ``IMAGEGEN_DERIVATIVE_WIDTHS`` may hold. A record lists nothing else
    unless written by hand, and a width it names is never encoded unchecked: 30000 would take
    gigabytes."""
    if name == "thumbnail":
        return key == keys.thumbnail
    if (parsed := parse_name(name)) is None:
        return False
    fmt, width = parsed
    if key != derivative_key(image.key, fmt, width):
        return False
    if width == image.width:
        return True
    try:
        _CONFIGURABLE_WIDTHS.validate_python([width])
    except ValidationError:
        return False
    return width < image.width


class DeriveStage:
    """Encodes the thumbnail and derivatives of an image persist has made final; records them.

    Runs after persist, not inside it: encoding is most of the work of finalising an image, and
    the Worker serves the PNG in their place until the derivatives record exists. Idempotent across
    replicas like persist: each derivative is written only if absent (encoding is deterministic,
    so every replica writes the same bytes), and the record last, first writer wins. A
    redelivered event, or one handled by two replicas at once, is answered with the stored
    record, once the event is shown to be the image's ``image.persisted``; a redelivery first
    remakes any object the record lists that storage has lost.

    Deliveries of one image in this process share one answer, encode included: a delivery
    cancelled at its timeout leaves the work running (an encode in a thread cannot be
    stopped), and its retry waits for that work instead of starting another encode beside it.
    """

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        # Per generation id, the work answering it now: kept until it ends, whoever still
        # waits for it, so the objects and the record are written once.
        self._running: dict[str, asyncio.Future[tuple[DerivedImage, bool]]] = {}

    async def run(self, image: PersistedImage) -> DerivedImage:
        keys = GenerationKeys.of_image(image.generation_id, image.key)
        await self._check_persisted(image, keys)
        gid = image.generation_id
        # Looked up and started with no await between: one piece of work per generation.
        work = self._running.get(gid)
        joined = work is not None
        if work is None:
            work = asyncio.ensure_future(self._answer(image, keys))
            self._running[gid] = work
            work.add_done_callback(functools.partial(self._finished, gid))
        # Shielded: a delivery cancelled (its timeout) stops waiting, the work goes on.
        answer, made_before = await asyncio.shield(work)
        if made_before or joined:  # another delivery's work, counted by it
            answered_again()
        return answer

    def _finished(self, gid: str, work: asyncio.Future[tuple[DerivedImage, bool]]) -> None:
        if self._running.get(gid) is work:
            del self._running[gid]
        if not work.cancelled():
            # Retrieved here: when every delivery waiting for it has gone, nobody else does,
            # and a later delivery starts afresh.
            work.exception()

    async def _answer(
        self, image: PersistedImage, keys: GenerationKeys
    ) -> tuple[DerivedImage, bool]:
        """The derivatives record of ``image``, and whether it was stored before."""
        existing = await self._stored_answer(keys)
        if existing is not None:
            log.info("derivatives already made", extra={"generation_id": image.generation_id})
            await self._remake_lost(image, keys, existing)
            return existing, True
        return await self._derive(image, keys)

    async def _derive(
        self, image: PersistedImage, keys: GenerationKeys
    ) -> tuple[DerivedImage, bool]:
        png = await self._stored_png(image, keys)
        thumbnail, derivatives = await asyncio.to_thread(
            _encode, png, image, self.settings.thumbnail_size, self.settings.derivative_widths
        )
        created = await _create_all(
            self.storage,
            [(keys.thumbnail, thumbnail, THUMBNAIL_TYPE)]
            + [(d.key, d.data, d.content_type) for d in derivatives],
        )
        thumbnail_size = self.settings.thumbnail_size
        if not created[0]:  # an earlier writer's thumbnail is the one stored
            thumbnail_size = await self._stored_thumbnail_size(keys, thumbnail, thumbnail_size)

        # The record, written last: its presence tells the Worker the thumbnail and every
        # derivative it lists are stored. Its content is a function of the event and the
        # settings of its first writer, the stored thumbnail's size among them, so a
        # redelivery remakes a lost object as that writer made it.
        derived = DerivedImage(
            generation_id=image.generation_id,
            key=keys.image,
            sha256=image.sha256,
            keys={
                "record": keys.derivatives,
                "thumbnail": keys.thumbnail,
                **{d.name: d.key for d in derivatives},
            },
            thumbnail_size=thumbnail_size,
            created_at=image.created_at,
            persisted_at=image.persisted_at,
            replay_of=image.replay_of,
        )
        body = json.dumps({"derived": derived.model_dump(mode="json")}, indent=2).encode()
        if await self.storage.create(keys.derivatives, body, content_type="application/json"):
            return derived, False
        # Another replica wrote the record first: answer with it, as it would.
        existing = await self._stored_answer(keys)
        if existing is None:
            raise DependencyUnavailable(
                f"the record {keys.derivatives!r} was written but cannot be read yet",
                retry_after=1,
            )
        return existing, True

    async def _stored_png(self, image: PersistedImage, keys: GenerationKeys) -> bytes:
        """The PNG ``image`` describes, as :func:`~imagegen.persist.claim_image` shows it.

        The record's size is the stored object's as persist found it: storage's HEAD must still
        give it (an object replaced since may be of any size, and is refused unread), and one
        larger than any render makes, in a record written before persist refused such objects,
        is refused before anything is asked.
        """
        return await claim_image(
            self.storage,
            keys.image,
            image.sha256,
            size=image.size,
            described_by="its record",
            head=True,
        )

    async def _stored_thumbnail_size(
        self, keys: GenerationKeys, made: bytes, thumbnail_size: int
    ) -> int:
        """The size to record for the thumbnail an earlier writer stored, ``made`` being this
        delivery's at ``thumbnail_size``: ``thumbnail_size`` when the two have the same
        dimensions, else the stored one's longer side.

        A replica configured with another ``IMAGEGEN_THUMBNAIL_SIZE`` (a rollout), or one that
        died before its record, may have stored it. Both sizes make the same pixels when the
        dimensions agree; else the stored thumbnail's longer side is the size it was made at, or
        the image's own when that is smaller, which no thumbnail is made larger than. Either
        way a lost thumbnail is remade at the recorded size to the bytes stored now. Read from
        the WebP's header, no pixel decoded; one that is gone or cannot be read is recorded at
        ``thumbnail_size``, as though this delivery's had been stored: one over Pillow's pixel
        limit (a few KiB of WebP can say 14000 x 14000) among them, whether Pillow refuses it
        or only warns, as it does up to twice the limit.
        """
        try:
            stored = await self.storage.get(keys.thumbnail)
            # No await inside: the filter, process-wide, is gone before another task runs.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(stored), formats=("WEBP",)) as opened:
                    dimensions = opened.size
            with Image.open(io.BytesIO(made), formats=("WEBP",)) as opened:
                if opened.size == dimensions:
                    return thumbnail_size
        except NotFound:
            return thumbnail_size
        except (
            OSError,
            SyntaxError,
            ValueError,
            EOFError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as exc:
            log.warning(
                "a stored thumbnail that cannot be read: recorded at this replica's size",
                extra={"key": keys.thumbnail, "reason": f"{type(exc).__name__}: {exc}"[:200]},
            )
            return thumbnail_size
        return max(dimensions)

    async def _remake_lost(
        self, image: PersistedImage, keys: GenerationKeys, record: DerivedImage
    ) -> None:
        """Writes again what ``record`` lists and storage no longer holds (a restored bucket).

        Only a redelivery gets here: a first delivery writes every object before the record.
        Its cost when nothing is lost is one HEAD per listed object, all at once. An entry
        derive never writes (:func:`_written`: a record edited by hand) is logged and left
        alone, neither looked for nor remade. The answer stays the stored record. Without the
        PNG it describes nothing can be remade: that is logged, and the record answered all
        the same, as it is when the stored object is not that PNG (another size or digest). A
        read cut short stays a 503: the next delivery reads it again.
        """
        gid = image.generation_id
        listed = {name: key for name, key in record.keys.items() if name != "record"}
        foreign = {n: k for n, k in listed.items() if not _written(n, k, image, keys)}
        if foreign:
            log.warning(
                "the derivatives record lists objects derive does not write: not remade",
                extra={"generation_id": gid, "names": sorted(foreign)[:20]},
            )
        listed = {n: k for n, k in listed.items() if n not in foreign}
        found = await asyncio.gather(*(self.storage.head(key) for key in listed.values()))
        lost = {n: k for (n, k), head in zip(listed.items(), found, strict=True) if head is None}
        if not lost:
            return
        try:
            png = await self._stored_png(image, keys)
        except InvalidRequest as exc:
            log.warning(
                "derivatives lost, and the image they were made from is not stored: not remade",
                extra={"generation_id": gid, "keys": sorted(lost.values()), "reason": str(exc)},
            )
            return
        log.warning(
            "remaking lost derivatives", extra={"generation_id": gid, "keys": sorted(lost.values())}
        )
        # The thumbnail at its first writer's size, which the record keeps; a record written
        # before it was kept has only the current setting to go by.
        thumbnail_size = record.thumbnail_size or self.settings.thumbnail_size
        made = await asyncio.to_thread(_remake, png, image, thumbnail_size, lost)
        await _create_all(self.storage, made)

    async def _check_persisted(self, image: PersistedImage, keys: GenerationKeys) -> None:
        """Raises InvalidRequest unless ``image`` is the stored record's ``image.persisted``.

        Checked before anything is read or answered, so knowing a generation id is not enough
        to have its image encoded or its derivatives record returned.

        Raises:
            DependencyUnavailable: the metadata record is corrupt (a 503 naming it, retried
                while the Trigger retries, then dead-lettered until an operator repairs it:
                :func:`imagegen.persist.corrupt_record`). Its
                writer is persist, whose event was answered before this one was sent: the
                message says to repair it, not to remove it, which would fail this event.
        """
        try:
            body = await self.storage.get(keys.metadata)
        except NotFound:
            raise InvalidRequest(
                f"image {keys.image!r} has no record: it is not persisted",
                errors=[{"field": "key", "message": "no persisted image under this key"}],
            ) from None
        record = load_record(keys.metadata, body, written_from=_PERSIST_INPUT)
        stored = record_part(
            keys.metadata, record, "persisted", PersistedImage, written_from=_PERSIST_INPUT
        )
        if stored != image:
            differ = [
                n for n in type(image).model_fields if getattr(stored, n) != getattr(image, n)
            ]
            raise InvalidRequest(
                f"the event does not describe the image stored for generation"
                f" {image.generation_id!r}",
                errors=[{"field": n, "message": "not the stored record's"} for n in differ],
            )

    async def _stored_answer(self, keys: GenerationKeys) -> DerivedImage | None:
        """The stored derivatives record, or None when there is none yet.

        Raises:
            DependencyUnavailable: the record is corrupt (a 503 naming it:
                :func:`imagegen.persist.corrupt_record`).
        """
        try:
            body = await self.storage.get(keys.derivatives)
        except NotFound:
            return None
        return record_part(
            keys.derivatives, load_record(keys.derivatives, body), "derived", DerivedImage
        )


async def _create_all(storage: Storage, objects: list[tuple[str, bytes, str]]) -> list[bool]:
    """Writes each (key, bytes, content type) if absent; every write ends before this does.

    Returns:
        For each object, in order, whether this call stored it (False: one was there).
    """
    written = await asyncio.gather(
        *(storage.create(key, data, content_type=ctype) for key, data, ctype in objects),
        return_exceptions=True,
    )
    created: list[bool] = []
    for outcome in written:
        if isinstance(outcome, BaseException):
            raise outcome
        created.append(outcome)
    return created
