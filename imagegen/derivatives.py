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

from PIL import Image, ImageCms, ImageMath

from imagegen.errors import InvalidRequest

__all__ = [
    "FORMATS",
    "Derivative",
    "decode_pixels",
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


def _encode(image: Image.Image, fmt: str, **options: int) -> bytes:
    """``image`` in ``fmt`` with ``options`` (or the format's own), as a clear refusal if the
    encoder cannot take it: the same pixels fail alike at every delivery."""
    out = io.BytesIO()
    try:
        image.save(out, format=fmt.upper(), **(options or FORMATS[fmt][1]))
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidRequest(
            f"the stored image cannot be encoded as {fmt.upper()}"
            f" ({type(exc).__name__}: {str(exc)[:200]})",
            errors=[{"field": "image", "message": f"cannot be encoded as {fmt.upper()}"}],
        ) from None
    return out.getvalue()


MAX_PIXELS = 2048 * 2048
"""The largest image derive decodes: render's largest (2048 on a side, ``Dimension`` in
:mod:`imagegen.models`); derive decodes an image only at the size its record gives, read from
the PNG's header first. Measured in a fresh process for an image this large, the thumbnail and
the derivatives at 256, 512, 1024 and 2048 px of the costliest PNG to decode (noise, 16-bit
RGBA with an ICC profile, 28 MiB) peak at 232 MiB of RSS, 80 MiB of it the imports and the
PNG's bytes; render's own 8-bit RGB noise at 191 MiB. So a request needs under 200 MiB, and a
derive pod's two at once stay well within its 1 GiB."""


_SRGB = ImageCms.createProfile("sRGB")


def decode_pixels(png: bytes, *, size: tuple[int, int] | None = None) -> Image.Image:
    """The pixels of ``png`` as 8-bit sRGB, RGBA where any is transparent, else RGB: decoded
    once for the thumbnail and every derivative, which therefore carry no colour profile.

    Args:
        png: The stored image.
        size: The (width, height) its record gives: checked against the PNG's header before
            anything is decoded.

    Raises:
        InvalidRequest: naming ``width`` or ``height`` when the PNG is not of ``size``, or
            ``image`` when the stored bytes are no PNG that decodes (cut short, corrupt) or
            one too large to decode (a decompression bomb): the same bytes fail alike at every
            delivery, so the event can never succeed.
    """
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as opened:
            width, height = opened.size
            if size is not None and opened.size != size:
                raise _misdescribed(opened.size, size)
            if width * height > MAX_PIXELS:
                raise _undecodable(f"{width}x{height} is over {MAX_PIXELS:,} pixels")
            opened.load()
            return _srgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(f"{type(exc).__name__}: {exc}") from None


def _misdescribed(found: tuple[int, int], recorded: tuple[int, int]) -> InvalidRequest:
    names = ("width", "height")
    return InvalidRequest(
        "the stored image is not of the size its record gives",
        # Not the stored size: knowing an id is not enough to learn what is stored.
        errors=[
            {"field": name, "message": f"not the stored image's {name}"}
            for name, one, other in zip(names, found, recorded, strict=True)
            if one != other
        ],
    )


def _undecodable(why: str) -> InvalidRequest:
    return InvalidRequest(
        f"the stored image cannot be decoded ({why[:200]})",
        errors=[{"field": "image", "message": "not a PNG that decodes"}],
    )


def _srgb(image: Image.Image) -> Image.Image:
    """``image`` (any PNG mode) as 8-bit sRGB, RGB or RGBA, as a browser shows the PNG.

    16 bits a sample become 8 by their high byte, as Pillow reads 16-bit colour PNGs; any
    transparency (an alpha channel, a palette's or a ``tRNS`` colour) is kept as alpha, dropped
    only where every pixel is opaque; an embedded ICC profile is applied, converting to sRGB,
    and no format of derivative carries one. A profile that cannot be read, or that is not for
    the image's colours, is ignored, as browsers ignore it.
    """
    transparent = "transparency" in image.info
    pixels: Image.Image
    if image.mode.startswith("I"):
        # 16-bit grey: Pillow's conversions would clip it to 255 (white) instead of scaling.
        wide = image.convert("I")
        pixels = ImageMath.lambda_eval(lambda v: v["grey"] >> 8, grey=wide).convert("L")
        if isinstance(key := image.info.get("transparency"), int):
            alpha = ImageMath.lambda_eval(lambda v: (v["grey"] != key) * 255, grey=wide)
            pixels.putalpha(alpha.convert("L"))
    elif "A" in image.mode or transparent:
        pixels = image.convert("LA" if image.mode in ("1", "L", "LA") else "RGBA")
    else:
        pixels = image.convert("L" if image.mode in ("1", "L") else "RGB")
    profile = image.info.get("icc_profile")
    if profile:
        pixels = _profiled(pixels, profile)
    result = pixels.convert("RGBA" if "A" in pixels.mode else "RGB")
    if result.mode == "RGBA" and result.getchannel("A").getextrema() == (255, 255):
        result = result.convert("RGB")
    result.info.clear()  # no profile, EXIF or text: every format's derivative is plain sRGB
    return result


def _profiled(pixels: Image.Image, profile: bytes) -> Image.Image:
    """``pixels`` (L, LA, RGB or RGBA) converted from ``profile`` to sRGB; as they are when
    the profile cannot be read or is not for their colours."""
    alpha = pixels.getchannel("A") if "A" in pixels.mode else None
    colour = pixels.convert(pixels.mode.removesuffix("A")) if alpha is not None else pixels
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(colour, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):  # OSError: a profile that does not parse
        return pixels
    assert converted is not None  # not converted in place
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def make_thumbnail(image: Image.Image, size: int) -> bytes:
    """A WebP no larger than ``size`` on its longer side (deterministic for the same input)."""
    small = image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    return _encode(small, "webp", quality=85, method=4)


def make_derivatives(
    png: bytes | Image.Image, image_key: str, widths: Iterable[int]
) -> list[Derivative]:
    """Encodes every derivative of ``png`` (CPU-bound: run it off the event loop).

    Args:
        png: The stored full image, or its pixels from :func:`decode_pixels`.
        image_key: Its key, ``YYYY/MM/DD/<generation-id>.png``.
        widths: The configured target widths; those not narrower than the image are dropped.

    Returns:
        AVIF and WebP derivatives, narrowest first, each keeping the image's aspect ratio.
    """
    full = decode_pixels(png) if isinstance(png, bytes) else png
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
