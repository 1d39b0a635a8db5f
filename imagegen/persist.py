"""The persist stage: derivatives, the metadata record, public URLs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from datetime import UTC, datetime

from PIL import Image

from imagegen._locks import KeyedLocks
from imagegen.derivatives import make_derivatives
from imagegen.errors import InvalidRequest, NotFound
from imagegen.models import PersistedImage, RenderedImage
from imagegen.settings import Settings
from imagegen.storage.base import GenerationKeys, Storage
from imagegen.urls import public_url
from imagegen.validation import parse_model

__all__ = ["PersistStage", "make_thumbnail"]

log = logging.getLogger("imagegen.persist")


def make_thumbnail(png: bytes, size: int) -> bytes:
    """A WebP no larger than ``size`` on its longer side (deterministic for the same input)."""
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.convert("RGB").save(out, format="WEBP", quality=85, method=4)
    return out.getvalue()


class PersistStage:
    """Finalises a rendered image: thumbnail, JSON record, public URLs.

    Idempotent: when the record of a generation already exists, it is the answer, so a
    redelivered ``image.rendered`` event gets the same reply and writes nothing new.
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

        # Deliveries of one image in flight at once finalise it once, and answer alike.
        async with self._generation_lock(image.generation_id):
            return await self._finalise(image, keys)

    async def _finalise(self, image: RenderedImage, keys: GenerationKeys) -> PersistedImage:
        # 1. An existing record means this image is already finalised.
        if await self.storage.head(keys.metadata) is not None:
            record = json.loads(await self.storage.get(keys.metadata))
            log.info("image already persisted", extra={"generation_id": image.generation_id})
            return parse_model(PersistedImage, record["persisted"])

        # 2. Claim the image and check it is the one the event describes.
        try:
            png = await self.storage.get(keys.image)
        except NotFound:
            # A claim check that points at nothing is a bad event, not a reason to retry
            # (Knative would retry a 404).
            raise InvalidRequest(
                f"image {keys.image!r} is not in storage",
                errors=[{"field": "key", "message": "no stored image under this key"}],
            ) from None
        digest = hashlib.sha256(png).hexdigest()
        if digest != image.sha256:
            raise InvalidRequest(
                f"stored image {keys.image!r} does not match the event",
                errors=[{"field": "sha256", "message": f"stored object has {digest}"}],
            )

        # 3. Derivatives.
        thumbnail = await asyncio.to_thread(make_thumbnail, png, self.settings.thumbnail_size)
        await self._put(keys.thumbnail, thumbnail, "image/webp")
        derivatives = await asyncio.to_thread(
            make_derivatives, png, keys.image, self.settings.derivative_widths
        )
        for derivative in derivatives:
            await self._put(derivative.key, derivative.data, derivative.content_type)

        # 4. Public URLs and the record, written last: its presence marks the image final.
        urls = {"image": self._url(keys.image), "thumbnail": self._url(keys.thumbnail)}
        urls = {k: v for k, v in urls.items() if v is not None}
        persisted = PersistedImage(
            generation_id=image.generation_id,
            key=keys.image,
            location=self.storage.location(keys.image),
            url=urls.get("image"),
            keys={
                "image": keys.image,
                "thumbnail": keys.thumbnail,
                "metadata": keys.metadata,
                **{d.name: d.key for d in derivatives},
            },
            urls={k: v for k, v in urls.items() if v is not None},
            metadata_location=self.storage.location(keys.metadata),
            size=image.size,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            seed=image.seed,
            model=image.model,
            prompt=image.prompt.prompt,
            timings=image.timings,
            created_at=datetime.now(UTC),
        )
        record = {
            "persisted": persisted.model_dump(mode="json"),
            "request": image.prompt.model_dump(mode="json"),
        }
        await self._put(keys.metadata, json.dumps(record, indent=2).encode(), "application/json")
        return persisted

    def _url(self, key: str) -> str | None:
        base = self.settings.public_base_url
        if not base:
            return None
        secret = self.settings.url_signing_secret
        return public_url(
            base,
            key,
            secret=secret.get_secret_value() if secret else None,
            ttl=self.settings.signed_url_ttl,
        )

    async def _put(self, key: str, data: bytes, content_type: str) -> None:
        await self.storage.put(key, data, content_type=content_type)
