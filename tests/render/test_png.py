"""PNG text chunks: round trip, non-Latin text, byte-for-byte determinism; the encoder in
parts against Pillow's."""

from __future__ import annotations

import io
import os
import select
import signal
import struct
import zlib
from typing import Literal
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imagegen.render import png
from imagegen.render.png import encode_png, read_png_text


def _image(color: tuple[int, int, int] = (10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (16, 8), color)


def test_text_round_trips() -> None:
    text = {"prompt": "a red fox", "seed": "7", "model": "tiny", "generation_id": "g-1"}

    data = encode_png(_image(), text=text)

    assert read_png_text(data) == text
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (16, 8)
        assert image.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("prompt", ["夕暮れの灯台", "маяк в сумерках", "lighthouse 🌅", "Grüße"])
def test_non_latin_prompts_round_trip(prompt: str) -> None:
    data = encode_png(_image(), text={"prompt": prompt, "seed": "1"})

    assert read_png_text(data)["prompt"] == prompt


def test_latin1_goes_to_text_and_the_rest_to_international_text() -> None:
    assert b"iTXt" not in encode_png(_image(), text={"prompt": "Grüße"})
    assert b"iTXt" in encode_png(_image(), text={"prompt": "夕暮れ"})


def test_same_pixels_and_text_give_the_same_bytes() -> None:
    text = {"prompt": "夕暮れの灯台", "seed": "3"}

    assert encode_png(_image(), text=text) == encode_png(_image(), text=text)
    assert encode_png(_image(), text=text) != encode_png(_image((0, 0, 0)), text=text)


@pytest.mark.parametrize("key", ["", "x" * 80, " padded", "キー"])
def test_invalid_keywords_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="keyword"):
        encode_png(_image(), text={key: "value"})


def test_reading_something_else_fails_clearly() -> None:
    with pytest.raises(ValueError, match="not a readable PNG"):
        read_png_text(b"GIF89a not a png")


def _photo_like() -> Image.Image:
    """Smooth gradients with a little noise: what deflate meets in a rendered image."""
    y, x = np.mgrid[0:64, 0:96]
    noise = np.random.default_rng(0).integers(0, 4, (64, 96))
    pixels = np.stack([x * 2 + noise, y * 3 + noise, (x + y) + noise], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def test_the_default_strategy_is_the_one_pillow_uses_for_png() -> None:
    buffer = io.BytesIO()
    _photo_like().save(buffer, format="PNG", compress_level=6)
    assert encode_png(_photo_like(), text={}) == buffer.getvalue()


def test_run_length_encoding_gives_other_bytes_for_the_same_pixels() -> None:
    text = {"prompt": "a red fox"}
    default = encode_png(_photo_like(), text=text)
    rle = encode_png(_photo_like(), text=text, strategy="rle")
    assert rle != default
    assert rle == encode_png(_photo_like(), text=text, strategy="rle")
    assert read_png_text(rle) == text
    with Image.open(io.BytesIO(rle)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(_photo_like()))


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) chunks of a PNG file, each one's CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        at += 12 + length
    return chunks


def _image_data(data: bytes) -> bytes:
    """The filtered rows: the IDAT chunks inflated (zlib checks the stream's Adler-32)."""
    return zlib.decompress(b"".join(body for kind, body in _chunks(data) if kind == b"IDAT"))


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 16 KiB: small images are encoded in several parts too."""
    monkeypatch.setattr(png, "PART_BYTES", 16 * 1024)


def _large_photo_like(mode: str = "RGB") -> Image.Image:
    """Tall enough for several parts: gradients, noise and a flat band."""
    y, x = np.mgrid[0:300, 0:480]
    noise = np.random.default_rng(1).integers(0, 6, (300, 480))
    pixels = np.stack([x // 2 + noise, y + noise, (x + y) // 3 + noise, x % 7 * 30], axis=-1)
    pixels[100:140] = 200  # rows Up filters best
    pixels[200:210] = 0  # rows None filters best (it is tried first)
    image = Image.fromarray(pixels.astype(np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("strategy", ["default", "rle"])
@pytest.mark.usefixtures("small_parts")
def test_parts_hold_pillows_filtered_rows_and_decode_to_the_same_pixels(
    mode: str, strategy: Literal["default", "rle"]
) -> None:
    image = _large_photo_like(mode)
    text = {"prompt": "夕暮れの灯台", "seed": "3", "model": "tiny"}
    assert image.width * len(mode) * image.height > 2 * png.PART_BYTES  # more than two parts

    pillow = encode_png(image, text=text, strategy=strategy)
    parts = encode_png(image, text=text, strategy=strategy, threads=4)

    assert parts != pillow
    assert _image_data(parts) == _image_data(pillow)  # the same filter on every row
    stride = image.width * len(mode) + 1
    filters = {_image_data(pillow)[row * stride] for row in range(image.height)}
    assert filters == {0, 1, 2, 4}  # each filter Pillow tries was chosen somewhere
    # IHDR, the text chunks and IEND are Pillow's, byte for byte; one IDAT before IEND.
    assert [c for c in _chunks(parts) if c[0] != b"IDAT"] == [
        c for c in _chunks(pillow) if c[0] != b"IDAT"
    ]
    assert [kind for kind, _ in _chunks(parts)][-2:] == [b"IDAT", b"IEND"]
    assert read_png_text(parts) == text
    # Each part is primed with the end of the one before: small parts cost nothing in size.
    assert len(parts) <= len(pillow) * 1.005, (len(parts), len(pillow))
    with Image.open(io.BytesIO(parts)) as decoded:
        assert decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.usefixtures("small_parts")
def test_the_bytes_do_not_depend_on_the_number_of_threads() -> None:
    image, text = _large_photo_like(), {"prompt": "a red fox"}
    made = {encode_png(image, text=text, threads=n) for n in (2, 3, 8)}
    assert len(made) == 1


@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize(("strategy", "zlib_strategy"), [("default", 1), ("rle", 3)])
@pytest.mark.parametrize("level", [0, 1, 2, 6, 9])
def test_every_level_makes_a_stream_zlib_reads(
    level: int, strategy: Literal["default", "rle"], zlib_strategy: int
) -> None:
    image = _large_photo_like()
    parts = encode_png(image, text={}, level=level, strategy=strategy, threads=2)
    stream = b"".join(body for kind, body in _chunks(parts) if kind == b"IDAT")
    # The header zlib itself writes for this level and strategy (its level flags differ).
    reference = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib_strategy)
    assert stream[:2] == (reference.compress(b"x") + reference.flush())[:2]
    pillow = encode_png(image, text={}, level=level, strategy=strategy)
    assert _image_data(parts) == _image_data(pillow)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    mode=st.sampled_from(["L", "RGB", "RGBA"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_small_image_round_trips_through_parts(
    width: int, height: int, mode: str, seed: int
) -> None:
    channels = len(mode)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    pixels[:, : width // 2] = pixels[:, :1]  # runs, so that every filter gets its turn
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)

    with mock.patch.object(png, "PART_BYTES", 64):  # a part every few rows
        parts = encode_png(image, text={"k": "v"}, threads=2)

    assert _image_data(parts) == _image_data(encode_png(image, text={"k": "v"}))
    with Image.open(io.BytesIO(parts)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("strategy", ["default", "rle"])
def test_parts_of_the_real_size_cost_almost_nothing_in_file_size(
    strategy: Literal["default", "rle"],
) -> None:
    """A rendered image's size, in parts of :data:`PART_BYTES`: as one stream's, give or take
    the zlib build (Pillow's may be another)."""
    y, x = np.mgrid[0:640, 0:1024]
    rng = np.random.default_rng(2)
    smooth = np.stack([x / 5 + y / 9, y / 3, (x * y) / 3000], axis=-1) + rng.normal(
        0, 2, (640, 1024, 3)
    )
    image = Image.fromarray(np.clip(smooth, 0, 255).astype(np.uint8))
    assert image.width * 3 * image.height > 4 * png.PART_BYTES

    pillow = encode_png(image, text={}, strategy=strategy)
    parts = encode_png(image, text={}, strategy=strategy, threads=2)

    assert len(parts) <= len(pillow) * 1.002, (len(parts), len(pillow))


def test_rle_parts_are_deflated_by_zlib_ng_into_a_file_of_zlibs_size() -> None:
    """zlib-ng's RLE deflate (the render extra's) makes the parts; zlib's would make a file
    of the same size and image data (the same bytes, on every image measured)."""
    from zlib_ng import zlib_ng

    assert png._rle_compressobj() is zlib_ng.compressobj
    image = _large_photo_like()
    fast = encode_png(image, text={}, strategy="rle", threads=2)
    with mock.patch.object(png, "_rle_compressobj", return_value=zlib.compressobj):
        reference = encode_png(image, text={}, strategy="rle", threads=2)
    assert _image_data(fast) == _image_data(reference)
    assert abs(len(fast) - len(reference)) <= len(reference) * 0.002
    with Image.open(io.BytesIO(fast)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_other_modes_keep_pillows_encoder() -> None:
    image = Image.new("P", (8, 8), 3)
    assert encode_png(image, text={}, threads=4) == encode_png(image, text={})


def test_a_forked_child_encodes_in_parts_with_its_own_threads() -> None:
    image = _large_photo_like()
    expected = encode_png(image, text={}, threads=2)  # the pool now exists in this process
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(
                writer, b"same" if encode_png(image, text={}, threads=2) == expected else b"no"
            )
        finally:
            os._exit(0)
    os.close(writer)
    answered, _, _ = select.select([reader], [], [], 30)
    if not answered:  # the child waits on threads it does not have
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    assert answered, "the forked child never finished encoding"
    assert os.read(reader, 16) == b"same" and status == 0
