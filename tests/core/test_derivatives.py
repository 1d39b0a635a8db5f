"""AVIF and WebP derivatives: widths, names, formats, determinism."""

from __future__ import annotations

import io
import re
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen import ImageGenService, InvalidRequest
from imagegen.derivatives import (
    decode_pixels,
    derivative_key,
    derivative_widths,
    make_derivatives,
)
from imagegen.models import DerivedImage
from imagegen.png import pixel_data_fault
from imagegen.settings import Settings
from imagegen.urls import is_public_key
from tests.fakes.images import gradient_png as png
from tests.fakes.images import store_rendered

KEY = "2026/05/01/gen-1.png"


@pytest.mark.parametrize(
    ("image_width", "widths", "expected"),
    [
        (1024, [256, 512, 1024], [256, 512, 1024]),
        (600, [256, 512, 1024], [256, 512, 600]),
        (256, [256, 512, 1024], [256]),
        (200, [256, 512], [200]),
        (800, [512, 256, 512], [256, 512, 800]),
        (800, [], [800]),
    ],
)
def test_widths_never_upscale_and_always_include_the_image(
    image_width: int, widths: list[int], expected: list[int]
) -> None:
    assert derivative_widths(image_width, widths) == expected


def test_keys_are_served_shapes() -> None:
    assert derivative_key(KEY, "avif", 512) == "2026/05/01/gen-1.w512.avif"
    assert is_public_key(derivative_key(KEY, "webp", 64))
    with pytest.raises(ValueError, match="not an image key"):
        derivative_key("2026/05/01/gen-1.json", "avif", 64)


def test_derivatives_are_real_images_of_their_width() -> None:
    derivatives = make_derivatives(png(96, 48), KEY, [32, 64, 128])
    assert [(d.name, d.content_type) for d in derivatives] == [
        ("avif:32", "image/avif"),
        ("webp:32", "image/webp"),
        ("avif:64", "image/avif"),
        ("webp:64", "image/webp"),
        ("avif:96", "image/avif"),
        ("webp:96", "image/webp"),
    ]
    for derivative in derivatives:
        assert derivative.key == derivative_key(KEY, derivative.format, derivative.width)
        with Image.open(io.BytesIO(derivative.data)) as image:
            # The aspect ratio is kept: 2:1.
            assert image.format == derivative.format.upper()
            assert image.size == (derivative.width, derivative.width // 2)


def test_encoding_is_deterministic() -> None:
    source = png(64, 64)
    first = make_derivatives(source, KEY, [32])
    second = make_derivatives(source, KEY, [32])
    assert [d.data for d in first] == [d.data for d in second]


def test_widths_setting_reads_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_DERIVATIVE_WIDTHS", "320, 640")
    assert Settings().derivative_widths == [320, 640]
    monkeypatch.setenv("IMAGEGEN_DERIVATIVE_WIDTHS", "8")
    with pytest.raises(ValueError, match="derivative_widths"):
        Settings()


# Pillow mode → (bit depth, colour type) (PNG spec 11.2.2, table 11.1).
_PNG_TYPES = {"1": (1, 0), "L": (8, 0), "LA": (8, 4), "RGB": (8, 2), "RGBA": (8, 6)}
# Adam7: (first column, first row, column step, row step) of each pass (PNG spec 8.2).
_PASSES = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
_PASSES += [(0, 1, 1, 2)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _scanlines(image: Image.Image, *, interlaced: bool) -> bytes:
    """``image``'s rows as PNG stores them before compression: each after filter type 0, its
    samples packed (Pillow's own packing, a row at a time), pass by pass when interlaced."""
    pixels = np.asarray(image)
    rows = b""
    for column, row, column_step, row_step in _PASSES if interlaced else [(0, 0, 1, 1)]:
        sub = pixels[row::row_step, column::column_step]
        if sub.shape[0] and sub.shape[1]:
            part = Image.fromarray(sub.astype(np.uint8) * 255 if image.mode == "1" else sub)
            packed = part.convert(image.mode).tobytes()
            width = len(packed) // sub.shape[0]
            rows += b"".join(b"\0" + packed[at : at + width] for at in range(0, len(packed), width))
    return rows


def _png_of(image: Image.Image, stream: bytes, *, interlaced: bool, pieces: int = 1) -> bytes:
    """A PNG of ``image``'s header whose IDAT chunks (``pieces`` of them) hold ``stream``."""
    depth, colour_type = _PNG_TYPES[image.mode]
    header = struct.pack(">IIBBBBB", *image.size, depth, colour_type, 0, 0, int(interlaced))
    step = -(-len(stream) // pieces)
    idats = [_chunk(b"IDAT", stream[at : at + step]) for at in range(0, len(stream), step)]
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(idats) + _chunk(b"IEND", b"")


def _noise(mode: str, size: tuple[int, int]) -> Image.Image:
    channels = len(mode) if mode != "1" else 1
    samples = np.random.default_rng(7).integers(0, 256, (size[1], size[0], channels), np.uint8)
    image = Image.fromarray(samples.squeeze(2) if channels == 1 else samples)
    return image.convert(mode)


SHAPES = [
    ("RGB", (9, 9)),
    ("RGBA", (1, 1)),  # six of Adam7's seven passes empty
    ("LA", (3, 10)),
    ("1", (13, 5)),  # samples packed eight to a byte, rows padded to whole bytes
]


@pytest.mark.parametrize("interlaced", [False, True], ids=["sequential", "interlaced"])
@pytest.mark.parametrize(("mode", "size"), SHAPES, ids=[mode for mode, _ in SHAPES])
def test_pixel_data_must_be_exactly_the_images_rows(
    mode: str, size: tuple[int, int], interlaced: bool
) -> None:
    """One byte more or less than every row of every pass is refused; the exact rows, as
    Pillow reads them to the very pixels, are not."""
    image = _noise(mode, size)
    rows = _scanlines(image, interlaced=interlaced)
    whole = _png_of(image, zlib.compress(rows), interlaced=interlaced)
    with Image.open(io.BytesIO(whole)) as decoded:
        assert decoded.tobytes() == image.tobytes()  # the rows are the image's, as PNG says
    assert pixel_data_fault(whole) is None
    short = _png_of(image, zlib.compress(rows[:-1]), interlaced=interlaced)
    assert pixel_data_fault(short) == "a PNG whose pixel data ends before its image does"
    long = _png_of(image, zlib.compress(rows + b"\0"), interlaced=interlaced)
    assert pixel_data_fault(long) == "a PNG whose pixel data is longer than its image"


def test_pixel_data_is_read_across_idat_chunks_and_pieces() -> None:
    """A stream split over IDAT chunks is one stream; one that inflates to far more than a
    piece at a time (blank rows, a few hundred bytes deflated) is counted to its end."""
    image = Image.new("RGB", (512, 512))
    rows = _scanlines(image, interlaced=False)
    stream = zlib.compress(rows)
    assert len(rows) > 10 * (1 << 16) > 100 * len(stream)
    assert pixel_data_fault(_png_of(image, stream, interlaced=False, pieces=3)) is None
    fewer = _png_of(image, zlib.compress(rows[: -len(rows) // 3]), interlaced=False, pieces=3)
    assert pixel_data_fault(fewer) == "a PNG whose pixel data ends before its image does"


def test_a_stream_unfinished_or_damaged_inside_whole_chunks_is_refused() -> None:
    image = _noise("RGB", (16, 16))
    rows = _scanlines(image, interlaced=False)
    deflater = zlib.compressobj()
    unfinished = deflater.compress(rows) + deflater.flush(zlib.Z_SYNC_FLUSH)  # every row, no end
    stream = zlib.compress(rows)
    wrong_check = stream[:-1] + bytes([stream[-1] ^ 1])  # Adler-32 (RFC 1950 2.2) not the rows'
    for bad, why in [
        (unfinished, "a PNG whose pixel data ends before its image does"),
        (wrong_check, "a PNG whose pixel data does not inflate"),
        (b"not deflate", "a PNG whose pixel data does not inflate"),
    ]:
        assert pixel_data_fault(_png_of(image, bad, interlaced=False)) == why
    whole = _png_of(image, stream, interlaced=False)
    assert pixel_data_fault(whole[: whole.index(b"IEND") - 8]) == (
        "a PNG cut short in its pixel data"
    )


def test_decoding_refuses_pixel_data_that_ends_early_naming_the_image() -> None:
    """Every chunk whole and of its CRC, the stream complete, but holding 10 rows of 64:
    Pillow decoded the rest as black, and every derivative showed it."""
    image = _noise("RGB", (64, 64))
    rows = _scanlines(image, interlaced=False)
    short = _png_of(image, zlib.compress(rows[: 10 * (1 + 64 * 3)]), interlaced=False)
    with pytest.raises(InvalidRequest) as caught:
        decode_pixels(short, size=(64, 64))
    assert caught.value.fields == ["image"]
    assert (caught.value.status, caught.value.retryable) == (400, False)
    whole = _png_of(image, zlib.compress(rows), interlaced=False)
    assert decode_pixels(whole, size=(64, 64)).tobytes() == image.tobytes()


async def test_the_keys_description_names_every_key_a_record_has(tmp_path: Path) -> None:
    """The schema (and so the event's documentation) says what ``keys`` holds: each name a
    derived record has, its width written ``<width>``."""
    settings = Settings(storage_url=str(tmp_path), derivative_widths=[128])
    async with ImageGenService(settings) as service:
        when = datetime(2026, 11, 24, tzinfo=UTC)
        rendered = await store_rendered(service.storage, "keys-1", when, png(256, 256), "a flag")
        derived = await service.derive(await service.persist(rendered))
    description = DerivedImage.model_fields["keys"].description or ""
    named = set(re.findall(r"[a-z]+(?::<width>)?", description))
    kinds = {re.sub(r":\d+$", ":<width>", name) for name in derived.keys}
    assert kinds == {"record", "thumbnail", "avif:<width>", "webp:<width>"}
    assert kinds <= named
