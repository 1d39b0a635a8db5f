"""PNG text chunks: round trip, non-Latin text, byte-for-byte determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

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
