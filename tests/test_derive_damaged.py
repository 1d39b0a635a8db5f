"""Stored PNGs whose structure derive cannot decode as a browser shows it: rows of a filter
type PNG does not have, methods in the header PNG does not have, an animation, a palette
without its PLTE, a chunk too large for Pillow to read or one it raises on. persist refuses
them before its record; derive refuses them, for a record written before, as a 400 naming the
image at every delivery, without decoding a pixel."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imagegen import ImageGenService, InvalidRequest, Settings
from imagegen.derivatives import decode_pixels, parse_name
from imagegen.persist import _png_size
from imagegen.png import pixel_data_fault
from tests.fakes.images import store_rendered

NOW = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
SIZE = (256, 256)
# Adam7: (first column, first row, column step, row step) of each pass (PNG spec 8.2).
_PASSES = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
_PASSES += [(0, 1, 1, 2)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A chunk: its length, type, data and CRC-32 over type and data (PNG spec 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _rgb_png(
    rows: list[bytes],
    size: tuple[int, int] = SIZE,
    *,
    compression: int = 0,
    filter_method: int = 0,
    interlace: int = 0,
) -> bytes:
    """An 8-bit RGB PNG of ``rows`` (each its filter type byte and samples), its IHDR naming
    the ``compression``, ``filter_method`` and ``interlace`` methods (PNG spec 11.2.2)."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, compression, filter_method, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + _chunk(b"IEND", b"")
    )


def _grey_rows(filter_type: int = 0) -> list[bytes]:
    return [bytes([filter_type]) + bytes([128]) * 3 * SIZE[0]] * SIZE[1]


def _animated() -> bytes:
    """An APNG of two frames, red then blue, the first of them also its static image."""
    out = io.BytesIO()
    red, blue = Image.new("RGB", SIZE, (255, 0, 0)), Image.new("RGB", SIZE, (0, 0, 255))
    red.save(out, format="PNG", save_all=True, append_images=[blue], duration=100)
    return out.getvalue()


def _inserted(png: bytes, chunks: bytes, *, after_pixels: bool = False) -> bytes:
    """``png`` with ``chunks`` just before its first IDAT, or just before IEND."""
    at = png.index(b"IEND" if after_pixels else b"IDAT") - 4
    return png[:at] + chunks + png[at:]


def _palette_png() -> bytes:
    """A palette PNG (colour type 3) without its PLTE chunk: every index 0."""
    header = struct.pack(">IIBBBBB", *SIZE, 8, 3, 0, 0, 0)
    rows = (b"\x00" + bytes(SIZE[0])) * SIZE[1]
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


_PLTE = _chunk(b"PLTE", bytes([255, 0, 0]))
_LONG_TEXT = _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (2 << 20)))  # 2 MiB inflated

DAMAGED = {
    "unknown filter type": _rgb_png(_grey_rows(filter_type=5)),
    "unknown compression method": _rgb_png(_grey_rows(), compression=1),
    "unknown interlace method": _rgb_png(_grey_rows(), interlace=2),
    "animated": _animated(),
    # libpng refuses both ("Missing PLTE before IDAT"); Pillow made up a grey palette.
    "palette without PLTE": _palette_png(),
    "palette with PLTE after its pixels": _inserted(_palette_png(), _PLTE, after_pixels=True),
    # libpng refuses these too (pngrutil.c png_handle_PLTE: "PLTE: invalid", "PLTE:
    # duplicate"; pngset.c png_set_PLTE: "Invalid palette"); Pillow took them.
    "palette with PLTE of 4 bytes": _inserted(_palette_png(), _chunk(b"PLTE", bytes(4))),
    "palette with empty PLTE": _inserted(_palette_png(), _chunk(b"PLTE", b"")),
    "palette with two PLTE": _inserted(_palette_png(), _PLTE + _PLTE),
    # Pillow refuses to load it, past its MAX_TEXT_CHUNK: a ValueError, said as such.
    "zTXt too large after the pixels": _inserted(
        _rgb_png(_grey_rows()), _LONG_TEXT, after_pixels=True
    ),
    # Pillow's chunk handlers raise as it loads them: an IndexError (no method after the NUL,
    # which was a 500), a SyntaxError (another method), a ValueError (too short to read).
    "iCCP without its method after the pixels": _inserted(
        _rgb_png(_grey_rows()), _chunk(b"iCCP", b"p\0"), after_pixels=True
    ),
    "empty iCCP after the pixels": _inserted(
        _rgb_png(_grey_rows()), _chunk(b"iCCP", b""), after_pixels=True
    ),
    "iCCP of method 1 after the pixels": _inserted(
        _rgb_png(_grey_rows()), _chunk(b"iCCP", b"p\0\x01x"), after_pixels=True
    ),
    "zTXt of method 1 after the pixels": _inserted(
        _rgb_png(_grey_rows()), _chunk(b"zTXt", b"k\0\x01x"), after_pixels=True
    ),
    "gAMA cut short after the pixels": _inserted(
        _rgb_png(_grey_rows()), _chunk(b"gAMA", b"\0"), after_pixels=True
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED))
async def test_a_record_of_a_png_derive_cannot_show_is_a_400_naming_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Recorded by a persist that took them: a filter type or interlace method PNG does not
    have failed to decode, an unknown compression method was decoded as deflate (libpng, and
    so a browser, refuses it), and an animation was made into derivatives of its static image
    alone; a palette PNG without a PLTE before its pixels (libpng refuses it) was derived with
    a grey palette Pillow made up, and a text chunk too large for Pillow, or one its handler
    raises on, failed as it loaded (an IndexError a 500). Each is refused at every delivery,
    nothing decoded or encoded."""
    data = DAMAGED[case]
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(data, size=SIZE)
    assert caught.value.fields == ["image"]

    def refuse(*args: Any) -> None:
        raise AssertionError("decoded")

    # persist as it was before it refused these: its record describes the bytes as they are.
    monkeypatch.setattr("imagegen.persist._png_size", lambda png, described: described)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", refuse)
    async with ImageGenService(Settings(storage_url=str(tmp_path), derivative_widths=[64])) as s:
        persisted = await s.persist(await store_rendered(s.storage, "dmg", NOW, data, "a kite"))
        for _ in range(2):
            with pytest.raises(InvalidRequest) as caught:
                await s.derive(persisted)
            assert caught.value.fields == ["image"]
            assert (caught.value.status, caught.value.retryable) == (400, False)
    assert not list(tmp_path.rglob("*.webp")) and not list(tmp_path.rglob("*.derivatives.json"))


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (b"zTXt", b"k\0\0"),
        (b"iTXt", b"k\0\x01\0\0\0"),
        (b"iCCP", b"p\0\0"),
    ],
)
def test_a_chunk_before_the_pixels_too_large_for_pillow_is_said_as_such(
    kind: bytes, body: bytes
) -> None:
    """Pillow refuses to open a PNG whose text or profile chunk inflates past its
    MAX_TEXT_CHUNK (libpng reads it): the refusal says so, and persist's too, where it said
    "not a PNG"."""
    data = _inserted(_rgb_png(_grey_rows()), _chunk(kind, body + zlib.compress(b"a" * (2 << 20))))
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(data, size=SIZE)
    said = f"a PNG whose {kind.decode()} chunk inflates to more than 1,048,576 bytes"
    assert caught.value.fields == ["image"] and said in caught.value.message
    assert _png_size(data, SIZE) == f"{said}, more than the decoder here reads"
    fine = _inserted(_rgb_png(_grey_rows()), _chunk(kind, body + zlib.compress(b"a" * 1000)))
    assert decode_pixels(fine, size=SIZE).size == SIZE


def test_whatever_pillow_raises_of_the_stored_bytes_is_a_400_naming_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk Pillow's handler raises an IndexError on, which no check before it knew of:
    the same bytes fail alike at every delivery, so a 400 naming the image, not a 500."""
    monkeypatch.setattr("imagegen.derivatives.unreadable_chunk", lambda png: None)
    data = _inserted(_rgb_png(_grey_rows()), _chunk(b"iCCP", b"p\0"), after_pixels=True)
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(data, size=SIZE)
    assert caught.value.fields == ["image"] and "IndexError" in caught.value.message
    assert (caught.value.status, caught.value.retryable) == (400, False)


def test_a_process_short_of_memory_is_not_the_image_at_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def short(*args: Any) -> None:
        raise MemoryError

    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", short)
    with pytest.raises(MemoryError):
        decode_pixels(_rgb_png(_grey_rows()), size=SIZE)


def test_a_plte_in_a_grey_png_is_ignored_as_libpng_ignores_it() -> None:
    """PNG forbids it (PNG spec 11.2.3); libpng warns ("ignored in grayscale PNG") and shows
    the grey pixels, as Pillow does."""
    header = struct.pack(">IIBBBBB", *SIZE, 8, 0, 0, 0, 0)
    rows = (b"\x00" + bytes([128]) * SIZE[0]) * SIZE[1]
    grey = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _PLTE
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )
    assert decode_pixels(grey, size=SIZE).getpixel((0, 0)) == (128, 128, 128)


def _interlaced_rows(image: np.ndarray, filter_types: list[int]) -> list[bytes]:
    """``image``'s rows pass by pass (Adam7), the n-th row after ``filter_types[n % len]``."""
    rows: list[bytes] = []
    for column, row, column_step, row_step in _PASSES:
        sub = image[row::row_step, column::column_step]
        if sub.shape[0] and sub.shape[1]:
            rows += [line.tobytes() for line in sub]
    return [bytes([filter_types[n % len(filter_types)]]) + row for n, row in enumerate(rows)]


def test_every_rows_filter_type_is_read_across_passes_and_pieces() -> None:
    """Rows of every filter type PNG has, in rows of seven lengths (Adam7's passes of a
    300 x 300 image) over more than four 64 KiB pieces of inflated data, are taken, and
    Pillow decodes them; one row of another type anywhere, the last one included, is refused,
    as Pillow fails to decode it."""
    size = (300, 300)
    pixels = np.random.default_rng(7).integers(0, 256, (size[1], size[0], 3), np.uint8)
    rows = _interlaced_rows(pixels, [0, 1, 2, 3, 4])
    assert sum(map(len, rows)) > 4 * (1 << 16)
    whole = _rgb_png(rows, size, interlace=1)
    assert pixel_data_fault(whole) is None
    with Image.open(io.BytesIO(whole)) as decoded:
        decoded.load()
    for at in (0, len(rows) // 2 + 1, len(rows) - 1):
        bad = list(rows)
        bad[at] = b"\x05" + bad[at][1:]
        damaged = _rgb_png(bad, size, interlace=1)
        assert pixel_data_fault(damaged) == (
            "a PNG whose pixel data has a row of an unknown filter type"
        ), at
        with pytest.raises(OSError), Image.open(io.BytesIO(damaged)) as decoded:
            decoded.load()


def test_a_filter_method_png_does_not_have_is_refused_before_its_pixels() -> None:
    """Pillow refuses to open it ("unknown filter category"); derive's own check says so."""
    assert pixel_data_fault(_rgb_png(_grey_rows(), filter_method=1)) == (
        "a PNG whose header gives a filter method other than 0"
    )


@pytest.mark.parametrize("name", ["avif:\u00b2", "webp:\u0663", "avif:", "avif:-1", "gif:64"])
def test_a_record_name_of_no_ascii_width_or_known_format_stands_for_nothing(name: str) -> None:
    """A superscript two or an Arabic-Indic three are digits to ``str.isdigit()``: the width
    was handed to ``int()``, which refused it, a 500 at every delivery."""
    assert parse_name(name) is None
    assert parse_name("avif:512") == ("avif", 512)
