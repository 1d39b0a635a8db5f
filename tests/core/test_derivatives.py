"""AVIF and WebP derivatives: widths, names, formats, determinism."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imagegen.derivatives import derivative_key, derivative_widths, make_derivatives
from imagegen.settings import Settings
from imagegen.urls import is_public_key
from tests.fakes.images import gradient_png as png

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
