"""The storage contract, and the object keys derived from a generation."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from imagegen.errors import InvalidRequest

__all__ = [
    "GenerationKeys",
    "ObjectStore",
    "Storage",
    "StoredObject",
    "prompt_memo_key",
    "validate_key",
    "validate_metadata",
]

# One segment is one file name on local storage: ext4, XFS and APFS take 255 bytes; the
# local backend's hidden temporary and sidecar names add to a segment, so 200 leaves room.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_IMAGE_KEY = re.compile(r"([0-9]{4})/(0[1-9]|1[0-2])/(0[1-9]|[12][0-9]|3[01])/([^/]+)\.png")
_META_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Printable ASCII, no space at either end: S3 sends a value as an HTTP header's, whose
# surrounding whitespace is no part of it (RFC 9110, section 5.5), so it would come back trimmed.
_META_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")
# S3 caps user metadata at 2 KB (names plus values); the local backend keeps the same limit.
_META_MAX_BYTES = 2048


@dataclass(frozen=True)
class StoredObject:
    """An object as storage reports it."""

    key: str
    location: str
    size: int
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Storage(Protocol):
    """Where images and their records live. Keys are relative to the storage root.

    Implementations raise :class:`~imagegen.errors.DependencyUnavailable` when the store cannot
    be reached, and never block the event loop.
    """

    name: str

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` at ``key`` atomically, replacing what is there."""
        ...

    async def create(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> bool:
        """Write ``data`` at ``key`` unless an object is there already; True when this call did.

        The check and the write are one step in the store itself, so of any number of writers
        racing on one key, from any process or machine, exactly one gets True (first writer
        wins). The others read what the winner wrote and answer with it.
        """
        ...

    async def get(self, key: str) -> bytes:
        """Read the object at ``key``; :class:`~imagegen.errors.NotFound` when absent."""
        ...

    async def head(self, key: str) -> StoredObject | None:
        """The object at ``key`` without its body, or None when absent."""
        ...

    def location(self, key: str) -> str:
        """A URI for ``key`` (``file://…`` or ``s3://bucket/…``)."""
        ...

    async def check(self) -> None:
        """Raise DependencyUnavailable unless the store is reachable and writable."""
        ...


class ObjectStore(ABC):
    """What the backends' writes share: the key and metadata checked alike, the object reported
    alike. A backend stores the bytes in :meth:`_store` and :meth:`_store_new`.
    """

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` at ``key`` atomically, replacing what is there."""
        validate_key(key)
        meta = validate_metadata(metadata)
        location = await self._store(key, data, content_type, meta)
        return StoredObject(
            key=key,
            location=location,
            size=len(data),
            content_type=content_type,
            metadata=meta,
        )

    async def create(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> bool:
        """Write ``data`` at ``key`` unless an object is there already; True when this call did."""
        validate_key(key)
        return await self._store_new(key, data, content_type, validate_metadata(metadata))

    @abstractmethod
    async def _store(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> str:
        """Write the checked object, replacing what is there; returns its location."""

    @abstractmethod
    async def _store_new(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> bool:
        """Write the checked object unless one is there, in one step of the store."""


def prompt_memo_key(generation_id: str) -> str:
    """Where enhance keeps a generation's prompt: ``prompts/<generation-id>.json``.

    The one key without a date: a redelivery must find the memo before it knows the request's
    time, which the memo itself fixes. An event with no ``time`` takes the moment it arrives,
    so two deliveries either side of midnight would look under two days.
    """
    return validate_key(f"prompts/{generation_id}.json")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key.

    Raises:
        InvalidRequest: for absolute paths, ``..``, empty segments, backslashes or odd characters.
    """
    if not key or len(key) > 512 or key.startswith("/") or "\\" in key:
        raise InvalidRequest(
            f"invalid object key {key!r}",
            errors=[{"field": "key", "message": "not a relative key"}],
        )
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidRequest(
                f"invalid object key {key!r}",
                errors=[{"field": "key", "message": f"bad segment {segment!r}"}],
            )
    return key


def validate_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Return user metadata as every backend stores it: names lowercased, values printable ASCII.

    S3 sends metadata as ``x-amz-meta-<name>`` headers and lowercases the names; checking here
    makes the local backend refuse what S3 would refuse, so the backends stay interchangeable.

    Raises:
        InvalidRequest: naming ``metadata``, for bad names, non-ASCII values, values with a space
            at either end, or over 2 KB in all.
    """
    result: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        lowered = name.lower()
        if not _META_NAME.fullmatch(lowered):
            raise InvalidRequest(
                f"invalid metadata name {name!r}",
                errors=[{"field": "metadata", "message": f"bad name {name!r}"}],
            )
        if not isinstance(value, str) or not _META_VALUE.fullmatch(value):
            raise InvalidRequest(
                f"invalid metadata value for {name!r}",
                errors=[
                    {
                        "field": "metadata",
                        "message": f"{name!r}: not printable ASCII text without edge spaces",
                    }
                ],
            )
        result[lowered] = value
    if sum(len(k) + len(v) for k, v in result.items()) > _META_MAX_BYTES:
        raise InvalidRequest(
            "metadata too large",
            errors=[{"field": "metadata", "message": f"over {_META_MAX_BYTES} bytes"}],
        )
    return result


@dataclass(frozen=True)
class GenerationKeys:
    """Object keys of one generation: ``YYYY/MM/DD/<generation-id>.<kind>``.

    The date is the request's time (fixed by enhance), so every retry maps to the same keys.
    """

    generation_id: str
    requested_at: datetime

    @property
    def prefix(self) -> str:
        day = self.requested_at.astimezone(UTC)
        return f"{day:%Y/%m/%d}/{self.generation_id}"

    @property
    def image(self) -> str:
        return self._key(".png")

    @property
    def thumbnail(self) -> str:
        return self._key(".thumb.webp")

    @property
    def metadata(self) -> str:
        return self._key(".json")

    @property
    def derivatives(self) -> str:
        """The derivatives record: which AVIF/WebP derivatives exist (the Worker reads it)."""
        return self._key(".derivatives.json")

    def _key(self, suffix: str) -> str:
        return validate_key(self.prefix + suffix)

    @classmethod
    def of_image(cls, generation_id: str, image_key: str) -> GenerationKeys:
        """The keys of the generation whose full image is ``image_key`` (its day names them).

        Raises:
            InvalidRequest: naming ``key``, when it is not ``YYYY/MM/DD/<generation_id>.png``.
        """
        found = _IMAGE_KEY.fullmatch(image_key)
        try:
            year, month, date = (int(part) for part in found.groups()[:3]) if found else (0, 0, 0)
            day = datetime(year, month, date, tzinfo=UTC) if found else None
        except ValueError:  # a day the calendar does not have
            day = None
        if day is None or found is None or found.group(4) != generation_id:
            raise InvalidRequest(
                f"key {image_key!r} does not belong to generation {generation_id!r}",
                errors=[{"field": "key", "message": "expected YYYY/MM/DD/<generation_id>.png"}],
            )
        return cls(generation_id, day)
