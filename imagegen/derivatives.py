"""Derivatives of a rendered image: AVIF and WebP at a few widths, for browsers.

A derivative is named by its format and its real pixel width::

    YYYY/MM/DD/<generation-id>.w<width>.avif
    YYYY/MM/DD/<generation-id>.w<width>.webp

For each configured width narrower than the image there is one derivative of that width, and
there is always one at the image's own width, so nothing is ever upscaled and a browser asking
for any width finds a derivative at least that wide. The Worker picks among them by ``Accept``
and ``w`` (``docs/signed-urls.md``); the widths that exist are listed in the derivatives
record's ``keys`` as ``avif:<width>`` and ``webp:<width>`` (:mod:`imagegen.derive`).

Encoding is deterministic for the same input and settings (libavif and libwebp at fixed
quality and speed), so a redelivered event writes the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from imagegen.errors import InvalidRequest

__all__ = [
    "FORMATS",
    "Derivative",
    "decode_rgb",
    "derivative_key",
    "derivative_widths",
    "make_derivative",
    "make_derivatives",
    "make_thumbnail",
    "parse_name",
]

# Format name → (media type, Pillow encoder options). AVIF is most of derive's work: at
# libavif's speed 6 one 256 px image took 200 ms on one core, at speed 8 70 ms (a 512 px
# photo-like image 262 ms against 41 ms), for files of about the same size; 8 is libavif's
# usual choice for on-line encoding.
# One encoder thread: libavif's output depends on its thread count, which Pillow otherwise
# takes from the CPUs the process may use, so replicas on different nodes (or pinned to one
# core) would write different bytes of one derivative.
FORMATS: dict[str, tuple[str, dict[str, int]]] = {
    "avif": ("image/avif", {"quality": 60, "speed": 8, "max_threads": 1}),
    "webp": ("image/webp", {"quality": 80, "method": 4}),
}


@dataclass(frozen=True)
class Derivative:
    """One encoded derivative: its record name (``avif:512``), key and bytes."""

    format: str
    width: int
    key: str
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.format}:{self.width}"

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][0]


def derivative_key(image_key: str, fmt: str, width: int) -> str:
    """The key of the ``fmt`` derivative ``width`` pixels wide of the PNG at ``image_key``."""
    if not image_key.endswith(".png"):
        raise ValueError(f"not an image key: {image_key!r}")
    return f"{image_key.removesuffix('.png')}.w{width}.{fmt}"


def parse_name(name: str) -> tuple[str, int] | None:
    """The format and width a record name (``avif:512``) stands for; None for another name."""
    fmt, _, width = name.partition(":")
    if fmt not in FORMATS or not width.isdigit():
        return None
    return fmt, int(width)


def derivative_widths(image_width: int, widths: Iterable[int]) -> list[int]:
    """The widths to make for an image ``image_width`` wide: those narrower, and its own."""
    return sorted({w for w in widths if w < image_width} | {image_width})


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt.upper(), **FORMATS[fmt][1])
    return out.getvalue()


MAX_PIXELS = 8192 * 8192
"""The largest image derive decodes: four times any render's size (models.md), far below
what would exhaust a derive pod's memory (a decoded RGB image is three bytes a pixel)."""


def decode_rgb(png: bytes) -> Image.Image:
    """The pixels of ``png`` as RGB: decoded once for the thumbnail and every derivative.

    Raises:
        InvalidRequest: naming ``image`` when the stored bytes are no PNG that decodes (cut
            short, corrupt) or one too large to decode (a decompression bomb): the same
            bytes fail alike at every delivery, so the event can never succeed.
    """
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise _undecodable(f"{width}x{height} is over {MAX_PIXELS:,} pixels")
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(f"{type(exc).__name__}: {exc}") from None


def _undecodable(why: str) -> InvalidRequest:
    return InvalidRequest(
        f"the stored image cannot be decoded ({why[:200]})",
        errors=[{"field": "image", "message": "not a PNG that decodes"}],
    )


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """A WebP no larger than ``size`` on its longer side (deterministic for the same input)."""
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="WEBP", quality=85, method=4)
    return out.getvalue()


def make_derivatives(
    png: bytes | Image.Image, image_key: str, widths: Iterable[int]
) -> list[Derivative]:
    """Encodes every derivative of ``png`` (CPU-bound: run it off the event loop).

    Args:
        png: The stored full image, or its pixels from :func:`decode_rgb`.
        image_key: Its key, ``YYYY/MM/DD/<generation-id>.png``.
        widths: The configured target widths; those not narrower than the image are dropped.

    Returns:
        AVIF and WebP derivatives, narrowest first, each keeping the image's aspect ratio.
    """
    full = decode_rgb(png) if isinstance(png, bytes) else png
    result: list[Derivative] = []
    for width in derivative_widths(full.width, widths):
        sized = _sized(full, width)
        for fmt in FORMATS:
            key = derivative_key(image_key, fmt, width)
            result.append(Derivative(fmt, width, key, _encode(sized, fmt)))
    return result


def make_derivative(pixels: Image.Image, image_key: str, fmt: str, width: int) -> Derivative:
    """One derivative, the very bytes :func:`make_derivatives` makes for it (CPU-bound)."""
    sized = _sized(pixels, width)
    return Derivative(fmt, width, derivative_key(image_key, fmt, width), _encode(sized, fmt))


def _sized(full: Image.Image, width: int) -> Image.Image:
    """``full`` at ``width`` pixels wide, its aspect ratio kept (itself at its own width)."""
    if width == full.width:
        return full
    height = max(1, round(full.height * width / full.width))
    return full.resize((width, height), Image.Resampling.LANCZOS)
