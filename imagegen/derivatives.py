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
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageMath

from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.png import Header, pixel_data_fault, read_header, unreadable_chunk, unshowable

__all__ = [
    "FORMATS",
    "Derivative",
    "check_encoders",
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


def check_encoders() -> None:
    """Refuse a Pillow that cannot encode every format of :data:`FORMATS`, before derive takes
    an image: each would fail alike (a wheel without libavif, as Pillow 11.2's are, has no AVIF
    encoder).

    Raises:
        ConfigurationError: Pillow has no encoder for one of them; retried, not the image's
            fault, until Pillow is replaced.
    """
    import PIL
    from PIL import features

    # No setting is at fault (the error names none): the installed Pillow is.
    missing = " and ".join(fmt.upper() for fmt in FORMATS if not features.check(fmt))
    if missing:
        raise ConfigurationError(
            f"Pillow {PIL.__version__} has no {missing} encoder, which derive needs (Pillow's"
            " wheels carry it since 11.3; a Pillow built from source needs libavif and libwebp)"
        )


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
    # ASCII digits only: str.isdigit() takes "²", which int() refuses.
    if fmt not in FORMATS or not (width.isascii() and width.isdigit()):
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
the PNG's header first, and reads only a PNG of at most
:data:`~imagegen.models.MAX_PNG_BYTES` (40 MiB), refused from its record's size before. Measured
in a fresh process for the largest PNG allowed (40 MiB: 2048 x 2048 16-bit RGBA noise, the
costliest to decode, with an ICC profile and a private chunk filling it up), its decode, the
thumbnail and the derivatives at 256, 512, 1024 and 2048 px peak at 270 to 285 MiB of RSS
(``ru_maxrss``, three runs), 40 MiB of it the imports and 40 MiB the PNG's bytes; render's own
8-bit RGB noise (12 MiB) at 182 MiB. So a request needs under 300 MiB, and a derive pod's two
at once stay within its 1 GiB."""


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
            one too large to decode (a decompression bomb), or whatever else Pillow raises
            of them: the same bytes fail alike at every delivery, so the event can never
            succeed. A MemoryError is not the image's fault, and is raised as it is.
    """
    if (why := unreadable_chunk(png)) is not None:
        raise _undecodable(why)
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as opened:
            width, height = opened.size
            if size is not None and opened.size != size:
                raise _misdescribed(opened.size, size)
            if width * height > MAX_PIXELS:
                raise _undecodable(f"{width}x{height} is over {MAX_PIXELS:,} pixels")
            if (why := unshowable(png, opened)) is not None:
                raise InvalidRequest(
                    f"the stored image cannot be shown as a browser shows it ({why})",
                    errors=[{"field": "image", "message": why}],
                )
            if (why := pixel_data_fault(png)) is not None:
                raise _undecodable(why)  # Pillow would fill the missing rows with black
            opened.load()
            return _srgb(opened, read_header(png))
    except (InvalidRequest, MemoryError):
        raise  # said already; or this process short of memory, not the image at fault
    except Exception as exc:
        # OSError, SyntaxError and ValueError of a PNG damaged or one Pillow refuses, a
        # DecompressionBombError (or its warning, where warnings are errors), an IndexError of
        # a chunk handler it does not guard: the same bytes fail alike at every delivery.
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


def _srgb(image: Image.Image, header: Header) -> Image.Image:
    """``image`` (any PNG mode) as 8-bit sRGB, RGB or RGBA, as a browser shows the PNG.

    16 bits a sample become 8 by their high byte, as Pillow reads 16-bit colour PNGs; any
    transparency (an alpha channel, a palette's or a ``tRNS`` colour) is kept as alpha, dropped only
    where every pixel is opaque. The colour space is the one of highest precedence that the PNG
    gives (PNG 3rd edition, 4.3 "Colour space information": cICP, then iCCP, then sRGB, then cHRM
    and gAMA). A ``cICP`` chunk says sRGB (:func:`~imagegen.png.unshowable` refused any other):
    every other colour chunk is ignored, and a narrow-range image's samples are stretched to full
    range (:func:`_full_range`). Else an embedded ICC profile is applied, converting to sRGB; with
    neither a profile nor an ``sRGB`` chunk, a ``gAMA`` chunk's transfer function is
    (:func:`_gamma_corrected`); no format of derivative carries a profile. A profile that cannot be
    read, or that is not for the image's colours, is ignored, as browsers ignore it, and the next
    chunk down taken. ``cHRM`` is not applied: primaries other than sRGB's are not converted.
    """
    _transparency_as_libpng(image, header)
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
    if header.cicp is not None:
        if header.cicp[3] == 0:
            pixels = _full_range(pixels)
    elif profile and (converted := _profiled(pixels, profile)) is not None:
        pixels = converted
    elif "srgb" not in image.info:
        pixels = _gamma_corrected(pixels, image.info.get("gamma"))
    result = pixels.convert("RGBA" if "A" in pixels.mode else "RGB")
    if result.mode == "RGBA" and result.getchannel("A").getextrema() == (255, 255):
        result = result.convert("RGB")
    result.info.clear()  # no profile, EXIF or text: every format's derivative is plain sRGB
    return result


def _transparency_as_libpng(image: Image.Image, header: Header) -> None:
    """Gives ``image`` the transparency libpng, and so a browser, shows it with: the ``tRNS``
    chunk libpng takes (:func:`~imagegen.png.read_header`), or none.

    Pillow takes the last ``tRNS`` chunk of any length it can read, where libpng takes the
    first of the colour type's length and ignores the rest (pngrutil.c ``png_handle_tRNS``):
    one before a palette PNG's ``PLTE`` ("out of place"), one with more alphas than the
    palette has entries ("invalid"), a truecolour PNG's before its ``PLTE`` (cancelled by
    ``png_handle_PLTE``: "tRNS must be after"). libpng compares a grey or 8-bit RGB key with
    the samples masked to the bit depth (:func:`_grey_key`; pngrtran.c ``png_do_expand``:
    ``trans_color->red & 0xff``); 16-bit RGB with a key :func:`~imagegen.png.unshowable`
    refused.
    """
    image.info.pop("transparency", None)
    data = header.transparency
    if data is None:
        return
    if header.colour_type == 3:
        image.info["transparency"] = data  # an alpha for each palette entry, in order
    elif header.colour_type == 2:
        image.info["transparency"] = tuple(sample & 0xFF for sample in struct.unpack(">3H", data))
    else:
        image.info["transparency"] = _grey_key(int.from_bytes(data), header.depth)


def _grey_key(key: int, depth: int) -> int:
    """A ``tRNS`` grey key, as stored, as one of the samples Pillow decodes a PNG of ``depth``
    bits to: 16 bits as stored, fewer as 8.

    libpng masks the key to the bit depth and scales one under 8 bits as it scales the samples
    (pngrtran.c ``png_do_expand``: ``gray = (gray & 0x03) * 0x55`` at 2 bits, ``& 0x01`` then
    ``* 0xff`` at 1, ``& 0x0f`` then ``* 0x11`` at 4, ``gray & 0xff`` at 8), warning of a key
    over the depth's largest sample (pngset.c ``png_set_tRNS``: "tRNS chunk has out-of-range
    samples for bit_depth") but keeping it: key 7 at 2 bits is sample 3, white. Pillow scales
    the samples to 8 bits (its ``"1"`` mode 0 and 255, ``"L;2"`` and ``"L;4"`` unpackers: 3 is
    255) but keeps the key as stored (``PngImageFile.chunk_tRNS``), so no pixel matched it.
    """
    if depth == 16:
        return key
    top = (1 << depth) - 1
    return (key & top) * 255 // top


# libpng corrects no gamma within 5% of the display's (pnglibconf.h, PNG_GAMMA_THRESHOLD_FIXED
# 5000 of PNG_FP_1 100000): a file gamma within it of sRGB's nominal 1/2.2 is taken as sRGB.
_GAMMA_TOLERANCE = 0.05


def _gamma_corrected(pixels: Image.Image, gamma: object) -> Image.Image:
    """``pixels`` (L, LA, RGB or RGBA) whose samples were encoded with the ``gAMA`` chunk's
    ``gamma``, re-encoded for sRGB; as they are without one, or with one near sRGB's.

    A ``gAMA`` value is the exponent that took light to samples (PNG spec 11.3.3.2: sample =
    light ** gamma), so light is sample ** (1 / gamma); sRGB encodes light by its own curve
    (IEC 61966-2-1: 12.92 L up to 0.0031308, else 1.055 L ** (1 / 2.4) - 0.055). One 256-entry
    table for each colour band, alpha unchanged.
    """
    if not isinstance(gamma, float) or gamma <= 0 or abs(gamma * 2.2 - 1) <= _GAMMA_TOLERANCE:
        return pixels  # none, an invalid 0 (PNG spec 11.3.3.2 forbids it), or sRGB's own
    table = []
    for sample in range(256):
        light = (sample / 255) ** (1 / gamma)
        encoded = 12.92 * light if light <= 0.0031308 else 1.055 * light ** (1 / 2.4) - 0.055
        table.append(min(255, max(0, round(encoded * 255))))
    return _colours_mapped(pixels, table)


def _full_range(pixels: Image.Image) -> Image.Image:
    """``pixels`` (L, LA, RGB or RGBA) of a narrow-range image stretched to full range.

    A narrow-range sample of ``d`` bits is ``2 ** (d - 8) * (219 E + 16)`` for the value ``E``
    from 0 to 1 (Rec. ITU-T H.273 8.3, with matrix coefficients 0 for R, G and B alike), so at
    8 bits ``E`` is ``(sample - 16) / 219``, outside 16 to 235 clipped. Applied to the 8-bit
    samples: a 16-bit sample's high byte, a sample under 8 bits as Pillow scales it. Alpha is
    not a colour and stays as stored.
    """
    table = [min(255, max(0, round((sample - 16) * 255 / 219))) for sample in range(256)]
    return _colours_mapped(pixels, table)


def _colours_mapped(pixels: Image.Image, table: list[int]) -> Image.Image:
    """``pixels`` (L, LA, RGB or RGBA) with each colour sample ``s`` made ``table[s]``."""
    colours = len(pixels.mode.removesuffix("A"))
    alpha = list(range(256)) if pixels.mode.endswith("A") else []
    return pixels.point(table * colours + alpha)


def _profiled(pixels: Image.Image, profile: bytes) -> Image.Image | None:
    """``pixels`` (L, LA, RGB or RGBA) converted from ``profile`` to sRGB; None when the
    profile cannot be read or is not for their colours."""
    alpha = pixels.getchannel("A") if "A" in pixels.mode else None
    colour = pixels.convert(pixels.mode.removesuffix("A")) if alpha is not None else pixels
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(colour, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):  # OSError: a profile that does not parse
        return None
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
