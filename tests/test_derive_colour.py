"""Derivatives of stored PNGs that are not 8-bit RGB: as a browser shows the PNG, in sRGB.

Render writes 8-bit RGB without a colour profile; persist accepts any PNG whose digest the
claim check gives. derive makes every format from one conversion: 16 bits a sample scaled to 8,
transparency kept as alpha, an ICC profile applied and none embedded, so the thumbnail, the
AVIF and the WebP of one image agree with the PNG and with each other.
"""

from __future__ import annotations

import io
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms

from imagegen import ImageGenService, Settings
from tests.fakes.images import store_rendered

NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
SIZE = (256, 256)


def _png(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def _linear_light_profile() -> bytes:
    """An RGB profile with sRGB's primaries and a linear response: its 128 is sRGB's 188.

    lcms2's built-in sRGB profile with each tone curve (``rTRC``, ``gTRC``, ``bTRC``, one
    ``para`` tag) made ``Y = X`` (function type 0, gamma 1.0; ICC.1:2010 section 10.16).
    """
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    (count,) = struct.unpack_from(">I", icc, 128)
    for entry in range(count):
        signature, offset, _ = struct.unpack_from(">4sII", icc, 132 + 12 * entry)
        if signature in (b"rTRC", b"gTRC", b"bTRC"):
            struct.pack_into(">4s4xH2xi", icc, offset, b"para", 0, 1 << 16)
    return bytes(icc)


def _half_transparent() -> Image.Image:
    """Red on the right, and on the left nothing: transparent pixels whose colour is black."""
    image = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    image.paste((200, 0, 0, 255), (128, 0, 256, 256))
    return image


def _half_transparent_grey() -> Image.Image:
    """Mid-grey at 16 bits on the right, and on the left the value ``tRNS`` makes transparent."""
    image = Image.new("I;16", SIZE, 32768)
    image.paste(0, (0, 0, 128, 256))
    return image


# Each stored PNG, and (x, y) → the RGBA a browser shows there.
CASES: dict[str, tuple[bytes, dict[tuple[int, int], tuple[int, int, int, int]]]] = {
    "16-bit grey": (
        _png(Image.new("I;16", SIZE, 32768)),
        {(128, 128): (128, 128, 128, 255)},
    ),
    "16-bit grey, tRNS": (
        _png(_half_transparent_grey(), transparency=0),
        {(32, 128): (0, 0, 0, 0), (224, 128): (128, 128, 128, 255)},
    ),
    "RGBA": (
        _png(_half_transparent()),
        {(32, 128): (0, 0, 0, 0), (224, 128): (200, 0, 0, 255)},
    ),
    "grey and alpha": (
        _png(Image.new("LA", SIZE, (60, 128))),
        {(128, 128): (60, 60, 60, 128)},
    ),
    "palette, tRNS": (
        _png(_half_transparent().convert("P")),
        {(32, 128): (0, 0, 0, 0), (224, 128): (200, 0, 0, 255)},
    ),
    "RGB, linear-light profile": (
        _png(Image.new("RGB", SIZE, (128, 128, 128)), icc_profile=_linear_light_profile()),
        {(128, 128): (188, 188, 188, 255)},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_format_shows_the_png_as_a_browser_does(tmp_path: Path, case: str) -> None:
    data, expected = CASES[case]
    settings = Settings(storage_url=str(tmp_path), derivative_widths=[64])
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(service.storage, "colour", NOW, data, "a flag")
        derived = await service.derive(await service.persist(rendered))
    outputs = {name: key for name, key in derived.keys.items() if name != "record"}
    assert sorted(outputs) == ["avif:256", "avif:64", "thumbnail", "webp:256", "webp:64"]
    for name, key in outputs.items():
        with Image.open(tmp_path / key) as image:
            assert "icc_profile" not in image.info, name  # sRGB, as the pixels are
            scale = image.width / SIZE[0]
            rgba = image.convert("RGBA")
            for (x, y), want in expected.items():
                got = rgba.getpixel((int(x * scale), int(y * scale)))
                assert isinstance(got, tuple)
                # Lossy encoders: a few levels either way; a colour under full transparency is
                # whatever the encoder keeps, and never seen.
                compared = range(0 if want[3] else 3, 4)
                assert all(abs(got[i] - want[i]) <= 4 for i in compared), (name, (x, y), got)
