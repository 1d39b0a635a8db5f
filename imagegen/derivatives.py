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
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageMath

from imagegen.errors import ConfigurationError, InvalidRequest

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
    "pixel_data_fault",
    "unreadable_chunk",
    "unshowable",
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
            return _srgb(opened, _header(png))
    except (InvalidRequest, MemoryError):
        raise  # said already; or this process short of memory, not the image at fault
    except Exception as exc:
        # OSError, SyntaxError and ValueError of a PNG damaged or one Pillow refuses, a
        # DecompressionBombError (or its warning, where warnings are errors), an IndexError of
        # a chunk handler it does not guard: the same bytes fail alike at every delivery.
        raise _undecodable(f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class _Header:
    """What Pillow does not tell of a PNG: its IHDR fields, its ``cICP`` chunk's data, whether
    it has an ``acTL`` chunk and a ``PLTE`` chunk before its pixels, and where its first IDAT
    chunk starts."""

    width: int
    height: int
    depth: int
    colour_type: int
    compression: int
    filter_method: int
    interlace: int
    cicp: bytes | None
    animated: bool
    palette: bool
    pixels_at: int

    @property
    def interlaced(self) -> bool:
        return self.interlace == 1


def _header(png: bytes) -> _Header:
    """``png``'s header, once Pillow has opened it (so its chunks up to the pixels are whole).

    IHDR is the first chunk (PNG spec 5.6): its width, height, bit depth, colour type,
    compression, filter and interlace methods start at byte 16 of the file, after the
    signature (8) and the chunk's length and type (8) (PNG spec 11.2.2). Every chunk is its
    length (4 bytes), type (4), data, CRC (4) (PNG spec 5.3); the colour space chunks come
    before the first IDAT (PNG spec 5.6), as does an APNG's ``acTL`` (PNG 3rd edition 5.6).
    """
    width, height, depth, colour_type, compression, filter_method, interlace = struct.unpack_from(
        ">IIBBBBB", png, 16
    )
    cicp: bytes | None = None
    animated = palette = False
    at = 8
    while at + 8 <= len(png):
        length, kind = struct.unpack_from(">I4s", png, at)
        if kind == b"IDAT":
            break
        if kind == b"cICP" and cicp is None:
            cicp = png[at + 8 : at + 8 + length]
        animated = animated or kind == b"acTL"
        palette = palette or kind == b"PLTE"
        at += 12 + length
    return _Header(
        width=width,
        height=height,
        depth=depth,
        colour_type=colour_type,
        compression=compression,
        filter_method=filter_method,
        interlace=interlace,
        cicp=cicp,
        animated=animated,
        palette=palette,
        pixels_at=at,
    )


# A cICP chunk's colour primaries, transfer characteristics and matrix coefficients for sRGB
# (Rec. ITU-T H.273 tables 2-4: BT.709 primaries, IEC 61966-2-1's curve, RGB; PNG 3rd edition
# 11.3.2.6 allows only matrix coefficients 0), and its full range flags: 1 full, 0 narrow.
_SRGB_CICP = bytes([1, 13, 0])
_RANGES = (0, 1)


def unshowable(png: bytes, opened: Image.Image) -> str | None:
    """Why ``png`` (opened by Pillow, not loaded) cannot be shown as a browser shows it, or
    None: persist refuses such a PNG, which derive would fail for good, before its record.

    Four cases, none of which render writes (8-bit RGB, no ``tRNS``, no ``cICP``, one image):

    - A palette PNG (colour type 3) without a ``PLTE`` chunk before its first IDAT, which PNG
      requires (PNG spec 5.6, 11.2.3): libpng refuses it ("Missing PLTE before IDAT"), and so
      does a browser; Pillow makes up a grey palette. A ``PLTE`` in a grey PNG (colour types
      0 and 4), which PNG forbids, libpng only warns of and ignores ("ignored in grayscale
      PNG"), as Pillow does: it is taken.
    - 16-bit truecolour with a ``tRNS`` colour. A pixel is transparent only where all 16 bits
      of each sample equal the key's (PNG spec 11.3.2.1), but Pillow reads 16-bit RGB as
      8-bit, keeping each sample's high byte (``"RGB;16B"`` in PngImagePlugin's ``_MODES``),
      and has no mode that keeps all 16: the exact comparison cannot be made.
    - A ``cICP`` chunk that gives any colour space but sRGB (wide gamut such as BT.2020 or
      Display P3, HDR curves such as PQ or HLG), or that is not four bytes. ``cICP`` outranks
      every other colour chunk (PNG 3rd edition 4.3: decoders that recognise it ignore
      ``iCCP``, ``sRGB``, ``cHRM`` and ``gAMA``), and browsers honour it, so an ``iCCP``
      profile beside it is not what a browser shows, and nothing here converts from the
      colour spaces H.273 names but through an ICC profile.
    - An animated PNG (APNG: an ``acTL`` chunk, PNG 3rd edition 11.3.6.1). Browsers play its
      frames, which need not include the static image (the only one Pillow decodes without
      being asked for frames, and the only one a derivative would show).
    """
    header = _header(png)
    if header.colour_type == 3 and not header.palette:
        return "a palette PNG without a PLTE chunk before its pixel data, which libpng refuses"
    if header.animated:
        return "an animated PNG (acTL), whose frames a derivative cannot show"
    if header.colour_type == 2 and header.depth == 16 and "transparency" in opened.info:
        return "a 16-bit RGB PNG with a transparent colour (tRNS), which cannot be read exactly"
    if header.cicp is not None and (
        len(header.cicp) != 4 or header.cicp[:3] != _SRGB_CICP or header.cicp[3] not in _RANGES
    ):
        return "a PNG whose cICP chunk gives a colour space other than sRGB"
    return None


def unreadable_chunk(png: bytes) -> str | None:
    """Why Pillow cannot read a chunk of ``png``, or why its text and profile chunks are
    more than is inflated of one PNG here; or None. Persist refuses such a PNG, which derive
    would fail for good, before its record, and derive before decoding.

    Each chunk up to IEND is held to what Pillow's handler of its type
    (``PngImagePlugin.PngStream.chunk_*``) raises on, where libpng and browsers skip the
    chunk, or read it, and show the image (Pillow reads those after the pixel data only to
    load it, so persist, which does not load, took them):

    - A ``zTXt`` or ``iCCP`` chunk with a compression method other than 0, or an ``iCCP``
      chunk without a NUL after its profile name and a method after that (``chunk_zTXt``,
      ``chunk_iCCP``); an ``iTXt`` chunk's flag and method Pillow checks by skipping it.
    - A ``zTXt``, ``iTXt`` or ``iCCP`` chunk that inflates to more than
      ``PngImagePlugin.MAX_TEXT_CHUNK`` (1 MiB; libpng reads up to 8 MB,
      ``PNG_USER_CHUNK_MALLOC_MAX``); a stream that does not inflate Pillow ignores.
    - A chunk shorter than the fields Pillow reads of it (``gAMA`` of under 4 bytes, a
      ``tRNS`` colour of under 6 in an RGB PNG, and the like: :data:`_SHORTEST`), an
      ``IHDR`` naming a filter method other than 0, and APNG's frame chunks (``fcTL``,
      ``fdAT``) out of their order or, of ``fcTL``, a frame reaching past the image.
    - Text and profile chunks that hold more than ``MAX_TEXT_MEMORY`` (64 MiB) in all, once
      inflated. Pillow counts only the text of chunks with a keyword; every chunk counts
      here, keyword or not, profiles and streams that fail part-way included, so the
      inflating this and Pillow do of one PNG is bounded: ten thousand keyword-less ``zTXt``
      chunks of 1 MiB each (10 MB of PNG) took ten CPU-seconds to inflate.

    Each stream is inflated once, no further than 1 MiB, and none after the total is past.
    """
    from PIL import PngImagePlugin

    limit, memory = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
    size = struct.unpack_from(">II", png, 16) if len(png) >= 24 else (0, 0)
    colour_type = png[25] if len(png) > 25 else -1
    held = 0  # bytes of text and profile, inflated, in the chunks so far
    sequence: int | None = None  # the last frame chunk's number
    at = 8
    while at + 12 <= len(png):  # a walk of millions of tiny chunks: little done for most
        length, kind = struct.unpack_from(">I4s", png, at)
        if kind not in _READ:
            if not kind.isalnum() and not kind.replace(b"_", b"a").isalnum():
                break  # Pillow's is_cid (\w{4}): it reads no further, nor refuses what follows
            at += 12 + length
            continue
        if kind == b"IEND" or at + 12 + length > len(png):
            break  # the end, or a PNG cut short, which persist refuses as such
        if kind == b"tEXt":  # held as it is: its text after the first NUL, if any
            nul = png.find(b"\0", at + 8, at + 8 + length)
            held += at + 7 + length - nul if nul >= 0 else 0
            if held > memory:
                return _too_much_text(memory)
            at += 12 + length
            continue
        data = png[at + 8 : at + 8 + length]
        shortest = _SHORTEST.get(kind, 0) if kind != b"tRNS" else _TRNS.get(colour_type, 0)
        if length < shortest:
            return (
                f"a PNG whose {kind.decode()} chunk is shorter than the decoder here reads of it"
                f" ({length} of {shortest} bytes)"
            )
        why: str | None = None
        if kind == b"IHDR" and data[11]:
            why = f"names filter method {data[11]}, not 0"
        elif kind in (b"fcTL", b"fdAT"):  # PngStream.chunk_fcTL, chunk_fdAT
            number = int.from_bytes(data[:4])
            first = sequence is None and kind == b"fcTL"
            if number != (0 if first else -1 if sequence is None else sequence + 1):
                why = "is out of the order APNG's frame chunks are numbered in"
            elif kind == b"fcTL":
                width, height, x, y = struct.unpack_from(">IIII", data, 4)
                if x + width > size[0] or y + height > size[1]:
                    why = "places a frame past the image's edge"
            sequence = number
        elif kind in _TEXT_CHUNKS:
            why, inflated = _text_chunk(kind, data, limit)
            if why is None and inflated > limit:
                return (
                    f"a PNG whose {kind.decode()} chunk inflates to more than {limit:,} bytes, more"
                    " than the decoder here reads"
                )
            held += inflated
            if held > memory:
                return _too_much_text(memory)
        if why is not None:
            return f"a PNG whose {kind.decode()} chunk {why}, which the decoder here refuses"
        at += 12 + length
    return None


def _too_much_text(memory: int) -> str:
    return (
        f"a PNG whose text and profile chunks hold more than {memory:,} bytes in all once"
        " inflated, more than is read of one PNG here"
    )


_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt", b"iCCP")
# The fewest bytes of each chunk's data that Pillow's handler of it takes (it raises
# "Truncated ... chunk" on fewer), and of a tRNS chunk by colour type: a grey sample (2 bytes)
# or an RGB colour (6); a palette's may be of any length.
_SHORTEST = {
    b"IHDR": 13,
    b"gAMA": 4,
    b"cHRM": 32,
    b"sRGB": 1,
    b"pHYs": 9,
    b"acTL": 8,
    b"fcTL": 26,
    b"fdAT": 4,
}
_TRNS = {0: 2, 2: 6}
_READ = frozenset([*_SHORTEST, b"tRNS", *_TEXT_CHUNKS, b"IEND"])  # the chunks looked into
_TEXT_PIECE = 1 << 14  # inflated at a time: a stream that fails counts up to its piece


def _text_chunk(kind: bytes, data: bytes, limit: int) -> tuple[str | None, int]:
    """What Pillow's handler of a ``kind`` chunk of ``data`` raises on, said in words, or
    None; and the bytes of text or profile it holds, inflated (past ``limit``: over it).

    Pillow's rules (``chunk_iCCP``, ``chunk_zTXt``, ``chunk_iTXt``, ``chunk_tEXt``): an
    ``iCCP`` chunk is a profile name, a NUL, the compression method (0) and the profile's
    stream, none of which may be missing; a ``zTXt`` chunk a keyword, a NUL, the method and
    the text's stream, any of them missing taken for empty; an ``iTXt`` chunk a keyword, a
    NUL, a compression flag and method, a language and a translated keyword each ended by a
    NUL, then the text, inflated where the flag is set and the method 0, and skipped whole
    where any of that is missing or the method is another; a ``tEXt`` chunk a keyword, a NUL
    and the text.
    """
    keyword_end = data.find(b"\0")
    if kind == b"iCCP":
        if keyword_end < 0:
            return "has no NUL after its profile name", 0
        if keyword_end + 1 == len(data):
            return "has no compression method after its profile name", 0
        if data[keyword_end + 1]:
            return f"names compression method {data[keyword_end + 1]}, not 0 (deflate)", 0
        return None, _inflated_size(data[keyword_end + 2 :], limit)
    if keyword_end < 0:
        return None, 0  # no text: Pillow takes the whole for a keyword
    value = data[keyword_end + 1 :]
    if kind == b"tEXt":
        return None, len(value)
    if kind == b"zTXt":
        if value and value[0]:
            return f"names compression method {value[0]}, not 0 (deflate)", 0
        return None, _inflated_size(value[1:], limit)
    # iTXt
    if len(value) < 2 or value[2:].count(b"\0") < 2:
        return None, 0
    text = value[2:].split(b"\0", 2)[2]
    if not value[0]:
        return None, len(text)
    return None, _inflated_size(text, limit) if value[1] == 0 else 0


def _inflated_size(stream: bytes, limit: int) -> int:
    """How many bytes zlib's ``stream`` inflates to, as Pillow inflates a text or profile
    chunk (``PngImagePlugin._safe_zlib_decompress``: a stream cut short gives what it holds),
    never past ``limit``: ``limit + 1`` where it holds more. A stream that fails (which
    Pillow ignores) counts what came out before the piece it fails in, and that piece whole:
    the work it took, at most."""
    inflater = zlib.decompressobj()
    size = 0
    while True:
        piece = min(_TEXT_PIECE, limit - size)
        try:
            out = len(inflater.decompress(stream, piece))
        except zlib.error:
            return size + piece
        size += out
        stream = inflater.unconsumed_tail
        if not stream or inflater.eof or not out:  # what follows the stream is not read
            return size
        if size >= limit:  # more in it than Pillow inflates
            return limit + 1


# Samples each channel of each colour type has (PNG spec 11.2.2, table 11.1).
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes, each (first column, first row, column step, row step) (PNG spec 8.2).
_ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)
_INFLATE_PIECE = 1 << 16  # the most inflated bytes held at once


def _rows(header: _Header) -> Iterator[tuple[int, int]]:
    """(rows, bytes a row) of each pass of ``header``'s image that has pixels (the whole image
    when not interlaced): each row its filter type byte and its samples packed to whole bytes
    (PNG spec 7.2, 7.3); a pass with no pixel has no row (PNG spec 8.2)."""
    bits = _CHANNELS[header.colour_type] * header.depth
    passes = _ADAM7 if header.interlaced else ((0, 0, 1, 1),)
    for column, row, column_step, row_step in passes:
        columns = max(0, -(-(header.width - column) // column_step))
        rows = max(0, -(-(header.height - row) // row_step))
        if columns and rows:
            yield rows, 1 + (columns * bits + 7) // 8


# The filter types of filter method 0, the only method (PNG spec 9.2): 0 None to 4 Paeth.
_LAST_FILTER_TYPE = 4


class _FilterTypes:
    """Checks the filter type byte that starts each row, as the inflated pixel data is read a
    piece at a time: one slice of each piece a pass, never a loop over its bytes."""

    def __init__(self, header: _Header) -> None:
        self._passes = _rows(header)
        self._read = 0  # bytes of the stream before the next piece
        self._next = 0  # where in the stream the next row starts
        self._left = 0  # rows of the current pass from there
        self._length = 0  # bytes a row of the current pass

    def known(self, piece: bytes) -> bool:
        """Whether every row that starts in ``piece``, the next bytes of the stream, starts
        with a filter type there is; rows beyond the image's are not looked at."""
        end = self._read + len(piece)
        while self._next < end:
            if not self._left:
                found = next(self._passes, None)
                if found is None:
                    break
                self._left, self._length = found
            count = min(self._left, -(-(end - self._next) // self._length))
            first = self._next - self._read
            if max(piece[first :: self._length][:count]) > _LAST_FILTER_TYPE:
                return False
            self._next += count * self._length
            self._left -= count
        self._read = end
        return True


def _header_fault(header: _Header) -> str | None:
    """Why ``header``'s IHDR names a method PNG does not have, or None: compression method 0
    (deflate) and filter method 0 are the only ones, interlace methods 0 (none) and 1 (Adam7)
    (PNG spec 11.2.2). libpng, and so a browser, refuses any other; Pillow takes an unknown
    compression method for deflate and an unknown interlace method for none, or fails to decode
    it."""
    if header.compression != 0:
        return "a PNG whose header gives a compression method other than 0"
    if header.filter_method != 0:
        return "a PNG whose header gives a filter method other than 0"
    if header.interlace not in (0, 1):
        return "a PNG whose header gives an interlace method other than 0 or 1"
    return None


def pixel_data_fault(png: bytes) -> str | None:
    """Why ``png``'s pixel data is not exactly its image, or None: persist refuses such a
    PNG, which derive would fail for good, before its record, and derive before decoding.

    Its header must name methods PNG has (:func:`_header_fault`). The IDAT chunks' data,
    joined, is one zlib stream (PNG spec 10.1) that inflates to each row of the image
    (:func:`_rows`), each starting with a filter type of 0 to 4 (PNG spec 9.2). Pillow fills
    rows the stream lacks with black and ignores any it has beyond them, and fails to decode a
    row of another filter type; so the stream is inflated once here, 64 KiB in and out at a
    time (none of it kept), each row's first byte looked at as it goes by, and refused unless
    it ends, its Adler-32 check matching, at exactly the image's size. Data after the stream's
    end is ignored, as libpng warns of it and reads on ("Extra compressed data", a benign
    error). ``png`` has been opened by Pillow (its chunks before IDAT whole); an IDAT chunk cut
    short is refused here too.
    """
    header = _header(png)
    if (why := _header_fault(header)) is not None:
        return why
    expected = sum(rows * length for rows, length in _rows(header))
    filters = _FilterTypes(header)
    inflater = zlib.decompressobj()
    inflated = 0

    def fault(piece: bytes) -> str | None:
        nonlocal inflated
        inflated += len(piece)
        if inflated > expected:
            return "a PNG whose pixel data is longer than its image"
        if not filters.known(piece):
            return "a PNG whose pixel data has a row of an unknown filter type"
        return None

    view = memoryview(png)
    at = header.pixels_at
    try:
        while at + 8 <= len(png) and not inflater.eof:
            length, kind = struct.unpack_from(">I4s", png, at)
            if kind != b"IDAT":  # IDAT chunks are consecutive (PNG spec 5.6)
                break
            end = min(at + 8 + length, len(png))
            # The input too in pieces: zlib copies what a call leaves unread, which for one
            # large chunk would be copied again at every piece of output.
            for start in range(at + 8, end, _INFLATE_PIECE):
                data: bytes | memoryview = view[start : min(start + _INFLATE_PIECE, end)]
                while data and not inflater.eof:
                    if why := fault(inflater.decompress(data, _INFLATE_PIECE)):
                        return why
                    data = inflater.unconsumed_tail
            at += 12 + length
        while not inflater.eof and (rest := inflater.decompress(b"", _INFLATE_PIECE)):
            if why := fault(rest):  # what a full piece held back
                return why
    except zlib.error:
        return "a PNG whose pixel data does not inflate"
    if at > len(png):
        return "a PNG cut short in its pixel data"
    if not inflater.eof or inflated < expected:
        return "a PNG whose pixel data ends before its image does"
    return None


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


def _srgb(image: Image.Image, header: _Header) -> Image.Image:
    """``image`` (any PNG mode) as 8-bit sRGB, RGB or RGBA, as a browser shows the PNG.

    16 bits a sample become 8 by their high byte, as Pillow reads 16-bit colour PNGs; any
    transparency (an alpha channel, a palette's or a ``tRNS`` colour) is kept as alpha, dropped
    only where every pixel is opaque. The colour space is the one of highest precedence that
    the PNG gives (PNG 3rd edition, 4.3 "Colour space information": cICP, then iCCP, then sRGB,
    then cHRM and gAMA). A ``cICP`` chunk says sRGB (:func:`unshowable` refused any other):
    every other colour chunk is ignored, and a narrow-range image's samples are stretched to
    full range (:func:`_full_range`). Else an embedded ICC profile is applied, converting to
    sRGB; with neither a profile nor an ``sRGB`` chunk, a ``gAMA`` chunk's transfer function is
    (:func:`_gamma_corrected`); no format of derivative carries a profile. A profile that
    cannot be read, or that is not for the image's colours, is ignored, as browsers ignore it,
    and the next chunk down taken. ``cHRM`` is not applied: primaries other than sRGB's are not
    converted.
    """
    if header.colour_type == 0 and header.depth < 8 and image.mode == "L":
        _scale_grey_key(image, header.depth)
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


def _scale_grey_key(image: Image.Image, depth: int) -> None:
    """Makes ``image``'s ``tRNS`` grey key (1, 2 or 4 bits) one of its 8-bit samples.

    Pillow scales grey samples under 8 bits to 8 (its ``"L;2"`` and ``"L;4"`` unpackers: 3 is
    255) but keeps the key as stored (``PngImageFile.chunk_tRNS``), so no pixel matched it and
    nothing was transparent. A pixel is transparent where its sample equals the key (PNG spec
    11.3.2.1): scaled alike, the key matches the same pixels. A key no sample can equal (over
    ``2**depth - 1``) makes none transparent.
    """
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return
    top = (1 << depth) - 1
    if key > top:
        del image.info["transparency"]
    else:
        image.info["transparency"] = key * 255 // top


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
