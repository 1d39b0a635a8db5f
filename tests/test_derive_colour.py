"""Derivatives of stored PNGs that are not 8-bit RGB: as a browser shows the PNG, in sRGB.

Render writes 8-bit RGB without a colour profile; persist accepts any PNG whose digest the
claim check gives. derive makes every format from one conversion: 16 bits a sample scaled to 8,
transparency kept as alpha, an ICC profile applied and none embedded, so the thumbnail, the
AVIF and the WebP of one image agree with the PNG and with each other.
"""

from __future__ import annotations

import io
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms

from imagegen import ImageGenService, InvalidRequest, Settings
from imagegen.derivatives import decode_pixels
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


def _raw_png(
    depth: int, colour_type: int, rows: list[bytes], *chunks: tuple[bytes, bytes]
) -> bytes:
    """A 256 x 256 PNG Pillow cannot write: ``rows`` of samples as they are packed (PNG spec
    7.2), each after filter type 0, and ``chunks`` (type, data) between IHDR and IDAT. A chunk
    is its length, type, data and CRC-32 over type and data (PNG spec 5.3)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", *SIZE, depth, colour_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    body = b"".join(chunk(kind, data) for kind, data in chunks)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + body
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def _half_keyed_grey(depth: int) -> bytes:
    """Grey at ``depth`` bits: on the left its largest value, which ``tRNS`` makes transparent;
    on the right black. Pillow scaled the samples to 8 bits but not the key, so nothing was."""
    top = (1 << depth) - 1
    per_byte = 8 // depth
    left = sum(top << (depth * i) for i in range(per_byte))  # one byte of ``top`` samples
    row = bytes([left]) * (128 // per_byte) + bytes(128 // per_byte)
    return _raw_png(depth, 0, [row] * SIZE[1], (b"tRNS", struct.pack(">H", top)))


def _grey_rgb(*chunks: tuple[bytes, bytes], sample: int = 128) -> bytes:
    """8-bit RGB, every sample ``sample``, with ``chunks``."""
    return _raw_png(8, 2, [bytes([sample]) * 3 * SIZE[0]] * SIZE[1], *chunks)


LINEAR_GAMMA = (b"gAMA", struct.pack(">I", 100_000))  # gamma 1.0: samples proportional to light
# An iCCP chunk: the profile's name, its end, compression method 0 and the deflated profile
# (PNG spec 11.3.3.3).
LINEAR_ICCP = (b"iCCP", b"linear\0\0" + zlib.compress(_linear_light_profile()))


def _cicp(
    primaries: int, transfer: int, matrix: int = 0, full_range: int = 1
) -> tuple[bytes, bytes]:
    """A cICP chunk (PNG 3rd edition 11.3.2.6): Rec. ITU-T H.273 code points and range."""
    return (b"cICP", bytes([primaries, transfer, matrix, full_range]))


SRGB_CICP = _cicp(1, 13)  # BT.709 primaries, sRGB curve, RGB, full range


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
    # With no cICP, iCCP or sRGB chunk, browsers apply gAMA (PNG spec 11.3.3.2): its 128 is
    # linear light's 128, sRGB's 188, as the linear-light profile's.
    "RGB, gAMA 1.0": (_grey_rgb(LINEAR_GAMMA), {(128, 128): (188, 188, 188, 255)}),
    # sRGB and cICP outrank gAMA (PNG 3rd edition, 4.3: cICP, iCCP, sRGB, then cHRM and gAMA).
    "RGB, gAMA 1.0 and sRGB": (
        _grey_rgb((b"sRGB", b"\0"), LINEAR_GAMMA),
        {(128, 128): (128, 128, 128, 255)},
    ),
    "RGB, gAMA 1.0 and cICP sRGB": (
        _grey_rgb(SRGB_CICP, LINEAR_GAMMA),
        {(128, 128): (128, 128, 128, 255)},
    ),
    # cICP outranks iCCP too: decoders that recognise it ignore the profile.
    "RGB, cICP sRGB and a linear-light profile": (
        _grey_rgb(SRGB_CICP, LINEAR_ICCP),
        {(128, 128): (128, 128, 128, 255)},
    ),
    # Narrow range (H.273 8.3): 16 is black, 235 white, so 60 is (60 - 16) / 219 of the way.
    "RGB, narrow-range cICP sRGB and a linear-light profile": (
        _grey_rgb(_cicp(1, 13, full_range=0), LINEAR_ICCP, LINEAR_GAMMA, sample=60),
        {(128, 128): (51, 51, 51, 255)},
    ),
    "RGB, narrow-range cICP sRGB, white": (
        _grey_rgb(_cicp(1, 13, full_range=0), sample=235),
        {(128, 128): (255, 255, 255, 255)},
    ),
    "RGB, gAMA 1/2.2": (
        _grey_rgb((b"gAMA", struct.pack(">I", 45_455))),
        {(128, 128): (128, 128, 128, 255)},
    ),
    # A grey key under 8 bits is compared with the samples as stored (PNG spec 11.3.2.1).
    "2-bit grey, tRNS": (
        _half_keyed_grey(2),
        {(32, 128): (255, 255, 255, 0), (224, 128): (0, 0, 0, 255)},
    ),
    "4-bit grey, tRNS": (
        _half_keyed_grey(4),
        {(32, 128): (255, 255, 255, 0), (224, 128): (0, 0, 0, 255)},
    ),
    "1-bit grey, tRNS": (
        _half_keyed_grey(1),
        {(32, 128): (255, 255, 255, 0), (224, 128): (0, 0, 0, 255)},
    ),
    # libpng masks a key over the bit depth to it, warning ("tRNS chunk has out-of-range
    # samples for bit_depth", pngset.c png_set_tRNS), and scales it as the samples (pngrtran.c
    # png_do_expand: (gray & 0x03) * 0x55): 7 at 2 bits is sample 3, white, transparent.
    "2-bit grey, tRNS key over the bit depth": (
        _raw_png(2, 0, [b"\xff" * 32 + b"\x55" * 32] * SIZE[1], (b"tRNS", struct.pack(">H", 7))),
        {(32, 128): (255, 255, 255, 0), (224, 128): (85, 85, 85, 255)},
    ),
    # At 8 bits too (png_do_expand: gray & 0xff): key 300 is sample 44.
    "grey, tRNS key over the bit depth": (
        _raw_png(8, 0, [bytes([44]) * 128 + bytes(128)] * SIZE[1], (b"tRNS", b"\x01\x2c")),
        {(32, 128): (44, 44, 44, 0), (224, 128): (0, 0, 0, 255)},
    ),
    # A palette's tRNS before its PLTE libpng ignores ("tRNS: out of place", pngrutil.c
    # png_handle_tRNS): opaque, where Pillow made every pixel transparent.
    "palette, tRNS before PLTE": (
        _raw_png(8, 3, [bytes(SIZE[0])] * SIZE[1], (b"tRNS", b"\0"), (b"PLTE", b"\xc8\0\0")),
        {(128, 128): (200, 0, 0, 255)},
    ),
    # More alphas than the palette has entries libpng ignores ("tRNS: invalid").
    "palette, tRNS longer than PLTE": (
        _raw_png(8, 3, [bytes(SIZE[0])] * SIZE[1], (b"PLTE", b"\xc8\0\0"), (b"tRNS", b"\x80\0")),
        {(128, 128): (200, 0, 0, 255)},
    ),
    # A second tRNS libpng ignores ("tRNS: duplicate"); Pillow took the last.
    "palette, two tRNS": (
        _raw_png(
            8,
            3,
            [bytes(SIZE[0])] * SIZE[1],
            (b"PLTE", b"\xc8\0\0"),
            (b"tRNS", b"\x80"),
            (b"tRNS", b"\0"),
        ),
        {(128, 128): (200, 0, 0, 128)},
    ),
    # A truecolour PNG's tRNS before a PLTE libpng cancels (png_handle_PLTE: "tRNS must be
    # after"): opaque.
    "RGB, tRNS before PLTE": (
        _grey_rgb((b"tRNS", struct.pack(">HHH", 128, 128, 128)), (b"PLTE", b"\0\0\0")),
        {(128, 128): (128, 128, 128, 255)},
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


def _rgb16_keyed() -> bytes:
    """16-bit RGB whose ``tRNS`` colour is (65535, 0, 0): on the left (65280, 0, 0), opaque,
    as every sample must match all 16 bits; on the right the key, transparent. Pillow reads
    both as (255, 0, 0), and compared the key's low byte: neither or both were transparent."""
    left = struct.pack(">HHH", 65280, 0, 0) * 128
    right = struct.pack(">HHH", 65535, 0, 0) * 128
    return _raw_png(16, 2, [left + right] * SIZE[1], (b"tRNS", struct.pack(">HHH", 65535, 0, 0)))


async def test_a_16_bit_rgb_png_with_a_transparent_colour_is_refused_naming_the_image(
    tmp_path: Path,
) -> None:
    """Pillow cannot read its samples' 16 bits, so which pixels are transparent cannot be
    known: persist refuses it before its record, and derive, for a record written before, at
    every delivery, as a 400 naming the image; nothing is encoded."""
    data = _rgb16_keyed()
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(data, size=SIZE)
    assert caught.value.fields == ["image"]

    settings = Settings(storage_url=str(tmp_path), derivative_widths=[64])
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(service.storage, "rgb16", NOW, data, "a flag")
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
    assert caught.value.fields == ["image"]
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.webp"))


@pytest.mark.parametrize(
    "cicp",
    [
        _cicp(9, 16),  # BT.2020 primaries, PQ: HDR
        _cicp(12, 13),  # Display P3
        _cicp(1, 13, matrix=1),  # YCbCr, which PNG does not allow
        _cicp(1, 13, full_range=2),
        (b"cICP", bytes([1, 13, 0])),
    ],
    ids=["BT.2020 PQ", "Display P3", "YCbCr", "no such range", "three bytes"],
)
async def test_a_png_whose_cicp_is_not_srgb_is_refused_naming_the_image(
    tmp_path: Path, cicp: tuple[bytes, bytes]
) -> None:
    """cICP outranks the profile beside it, and browsers honour it: derivatives made from the
    profile would not show what the PNG shows, so persist refuses it before its record, and
    derive, for a record written before, at every delivery; nothing is encoded."""
    data = _grey_rgb(cicp, LINEAR_ICCP)
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(data, size=SIZE)
    assert caught.value.fields == ["image"]

    settings = Settings(storage_url=str(tmp_path), derivative_widths=[64])
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(service.storage, "cicp", NOW, data, "a flag")
        with pytest.raises(InvalidRequest) as caught:
            await service.persist(rendered)
    assert caught.value.fields == ["image"]
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.webp"))
