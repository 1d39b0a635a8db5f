"""Checks of a PNG's bytes before it is decoded: where libpng, and so a browser, refuses the
PNG or shows it otherwise than Pillow would decode it.

Persist runs them before it records an image, and derive before it decodes one
(:func:`imagegen.derivatives.decode_pixels`), so a PNG that derive would fail for good is
refused at persist, naming the image, not found out later. None decodes a pixel, and each holds
bounded memory whatever the PNG says of itself: the chunk walk inflates a text or profile stream
no further than Pillow reads one and stops once they hold more than one PNG may
(:func:`unreadable_chunk`); the header and colour chunks are read as a browser takes them
(:func:`unshowable`); the pixel data is inflated once, 64 KiB at a time and none of it kept, to
check that it is exactly the image's rows (:func:`pixel_data_fault`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Header",
    "pixel_data_fault",
    "read_header",
    "unreadable_chunk",
    "unshowable",
]


@dataclass(frozen=True)
class Header:
    """What Pillow does not tell of a PNG: its IHDR fields, its ``cICP`` chunk's data, whether
    it has an ``acTL`` chunk and a ``PLTE`` chunk before its pixels, why libpng refuses its
    ``PLTE`` chunks (or None), the ``tRNS`` chunk's data that libpng takes (or None), and where
    its first IDAT chunk starts."""

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
    palette_fault: str | None
    transparency: bytes | None
    pixels_at: int

    @property
    def interlaced(self) -> bool:
        return self.interlace == 1


def read_header(png: bytes) -> Header:
    """``png``'s header, once Pillow has opened it (so its chunks up to the pixels are whole).

    IHDR is the first chunk (PNG spec 5.6): its width, height, bit depth, colour type,
    compression, filter and interlace methods start at byte 16 of the file, after the
    signature (8) and the chunk's length and type (8) (PNG spec 11.2.2). Every chunk is its
    length (4 bytes), type (4), data, CRC (4) (PNG spec 5.3); the colour space chunks come
    before the first IDAT (PNG spec 5.6), as does an APNG's ``acTL`` (PNG 3rd edition 5.6).

    ``PLTE`` and ``tRNS`` chunks before the first IDAT are taken as libpng 1.6 takes them
    (``png_handle_PLTE``, ``png_handle_tRNS`` in pngrutil.c, ``png_set_PLTE`` in pngset.c);
    after it, libpng ignores them ("out of place"), and so does this.
    """
    width, height, depth, colour_type, compression, filter_method, interlace = struct.unpack_from(
        ">IIBBBBB", png, 16
    )
    cicp: bytes | None = None
    animated = palette = False
    palette_fault: str | None = None
    entries = 0  # the palette's entries, as libpng keeps them
    transparency: bytes | None = None
    transparency_taken = False  # libpng's PNG_INFO_tRNS: a tRNS taken, even if cancelled since
    at = 8
    while at + 8 <= len(png):
        length, kind = struct.unpack_from(">I4s", png, at)
        if kind == b"IDAT":
            break
        if kind == b"cICP" and cicp is None:
            cicp = png[at + 8 : at + 8 + length]
        elif kind == b"PLTE":
            if palette:  # checked before the colour type: a grey PNG's second PLTE too
                palette_fault = "a PNG with two PLTE chunks, which libpng refuses"
            elif colour_type & 2:  # a grey PNG's libpng ignores ("ignored in grayscale PNG")
                if length > 3 * 256 or length % 3:
                    # "invalid": an error of a palette PNG; a truecolour PNG's PLTE, a
                    # suggested palette, libpng ignores, the tRNS before it standing.
                    if colour_type == 3:
                        palette_fault = (
                            "a palette PNG whose PLTE chunk is not whole palette entries"
                            " (3 bytes each, at most 256), which libpng refuses"
                        )
                elif length == 0:  # png_set_PLTE: "Invalid palette"
                    palette_fault = "a PNG with an empty PLTE chunk, which libpng refuses"
                else:
                    # Entries past what the bit depth indexes libpng drops, silently.
                    entries = min(length // 3, 1 << depth if colour_type == 3 else 256)
                    transparency = None  # a tRNS before it libpng cancels: "tRNS must be after"
            palette = True
        # The first tRNS libpng takes (a second it ignores: "duplicate"), of the right length
        # for the colour type, else "invalid": a grey key of 2 bytes, an RGB colour of 6, a
        # palette's alphas after its PLTE ("out of place" before it), at least one and no
        # more than the palette's entries; none with an alpha channel ("invalid with alpha
        # channel").
        elif (
            kind == b"tRNS"
            and not transparency_taken
            and (
                (colour_type == 0 and length == 2)
                or (colour_type == 2 and length == 6)
                or (colour_type == 3 and 0 < length <= entries)
            )
        ):
            transparency = png[at + 8 : at + 8 + length]
            transparency_taken = True
        animated = animated or kind == b"acTL"
        at += 12 + length
    return Header(
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
        palette_fault=palette_fault,
        transparency=transparency,
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

    Five cases, none of which render writes (8-bit RGB, no ``tRNS``, no ``cICP``, one image):

    - A palette PNG (colour type 3) without a ``PLTE`` chunk before its first IDAT, which PNG
      requires (PNG spec 5.6, 11.2.3): libpng refuses it ("Missing PLTE before IDAT"), and so
      does a browser; Pillow makes up a grey palette. A ``PLTE`` in a grey PNG (colour types
      0 and 4), which PNG forbids, libpng only warns of and ignores ("ignored in grayscale
      PNG"), as Pillow does: it is taken.
    - A PNG with ``PLTE`` chunks libpng refuses, where Pillow takes them (:func:`read_header`):
      two of them, in any colour type (pngrutil.c ``png_handle_PLTE``: "duplicate"); an empty
      one before a palette or truecolour image's pixels (pngset.c ``png_set_PLTE``: "Invalid
      palette"); one of a palette PNG whose length is not a multiple of 3 or is over 768
      bytes (``png_handle_PLTE``: "invalid"; a truecolour PNG's it ignores).
    - 16-bit truecolour with a ``tRNS`` colour that libpng takes (:func:`read_header`). A
      pixel is transparent only where all 16 bits
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
    header = read_header(png)
    if header.palette_fault is not None:
        return header.palette_fault
    if header.colour_type == 3 and not header.palette:
        return "a palette PNG without a PLTE chunk before its pixel data, which libpng refuses"
    if header.animated:
        return "an animated PNG (acTL), whose frames a derivative cannot show"
    if header.colour_type == 2 and header.depth == 16 and header.transparency is not None:
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


def _rows(header: Header) -> Iterator[tuple[int, int]]:
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

    def __init__(self, header: Header) -> None:
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


def _header_fault(header: Header) -> str | None:
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
    header = read_header(png)
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
