"""Test images: small PNGs with structure (a gradient), as an encoder would meet them, and a
PNG stored as render leaves one."""

from __future__ import annotations

import hashlib
import io
from datetime import datetime

from PIL import Image

from imagegen.models import EnhancedPrompt, RenderedImage
from imagegen.storage.base import GenerationKeys, Storage


def gradient_png(width: int, height: int) -> bytes:
    """A PNG ``width`` by ``height`` pixels whose pixels follow their coordinates."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, y % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def store_rendered(
    storage: Storage,
    generation_id: str,
    requested_at: datetime,
    png: bytes,
    prompt: str,
    *,
    job_size: tuple[int, int] | None = None,
) -> RenderedImage:
    """``png`` stored at its generation's key, and the claim check render answers for it.

    The job is the tiny model's (seed 7) at ``job_size``, by default the PNG's own size; a
    smaller PNG than any job asks for keeps encoding cheap where the pixels do not matter.
    """
    keys = GenerationKeys(generation_id, requested_at)
    await storage.put(keys.image, png, content_type="image/png")
    width, height = Image.open(io.BytesIO(png)).size
    job_width, job_height = job_size or (width, height)
    job = EnhancedPrompt(
        generation_id=generation_id,
        prompt=prompt,
        enhancer="passthrough",
        model="tiny",
        width=job_width,
        height=job_height,
        steps=2,
        guidance=0.0,
        seed=7,
        requested_at=requested_at,
    )
    return RenderedImage(
        generation_id=generation_id,
        key=keys.image,
        location=storage.location(keys.image),
        size=len(png),
        sha256=hashlib.sha256(png).hexdigest(),
        width=job.width,  # as render's reply says: the job's size
        height=job.height,
        seed=job.seed,
        model=job.model,
        steps=job.steps,
        guidance=job.guidance,
        prompt=job,
    )
