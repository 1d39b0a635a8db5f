"""Test images: small PNGs with structure (a gradient), as an encoder would meet them."""

from __future__ import annotations

import io

from PIL import Image


def gradient_png(width: int, height: int) -> bytes:
    """A PNG ``width`` by ``height`` pixels whose pixels follow their coordinates."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x % 256, y % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
