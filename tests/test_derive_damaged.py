"""Stored PNGs whose structure derive cannot decode as a browser shows it: rows of a filter
type PNG does not have, methods in the header PNG does not have, an animation. persist refuses
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
from imagegen.derivatives import decode_pixels, parse_name, pixel_data_fault
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


DAMAGED = {
    "unknown filter type": _rgb_png(_grey_rows(filter_type=5)),
    "unknown compression method": _rgb_png(_grey_rows(), compression=1),
    "unknown interlace method": _rgb_png(_grey_rows(), interlace=2),
    "animated": _animated(),
}


@pytest.mark.parametrize("case", list(DAMAGED))
async def test_a_record_of_a_png_derive_cannot_show_is_a_400_naming_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Recorded by a persist that took them: a filter type or interlace method PNG does not
    have failed to decode, an unknown compression method was decoded as deflate (libpng, and
    so a browser, refuses it), and an animation was made into derivatives of its static image
    alone. Each is refused at every delivery, nothing decoded or encoded."""
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
