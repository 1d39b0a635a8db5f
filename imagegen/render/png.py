"""PNG encoding with text chunks: what was drawn, from which seed, by which model.

Reading needs Pillow only, so persist and the CLI read the chunks back without torch. Encoding
is Pillow's, or with ``threads`` above 1 the parallel encoder here (numpy and zlib): the same
filtered rows as Pillow's, compressed in parts at once; with ``rle`` by zlib-ng, which runs
zlib's RLE deflate faster and, on every image measured, into the same bytes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "PNG_COMPRESS_LEVEL",
    "PngStrategy",
    "encode_filtered_png",
    "encode_png",
    "read_png_text",
]

PNG_COMPRESS_LEVEL = 6
"""The default zlib level; any fixed level gives the same bytes for the same pixels and text."""

PngStrategy = Literal["default", "rle"]
"""zlib's strategy: ``default`` is what libpng and Pillow use for PNG (``Z_FILTERED``: repeated
strings searched as hard as the level says); ``rle`` looks only for runs of one byte
(``Z_RLE``), whatever the level above 0. Runs are most of what deflate finds in filtered image
rows: ``rle`` files are within about 2 % of ``default`` ones on photographs, and made 2 to 8
times faster (docs/benchmarks.md)."""

_STRATEGIES = {"default": -1, "rle": zlib.Z_RLE}  # -1: Pillow's own choice for PNG

_MAX_KEYWORD = 79  # PNG keywords: 1-79 Latin-1 characters


def _check_keyword(key: str) -> None:
    try:
        key.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"PNG text keyword must be Latin-1, got {key!r}") from None
    if not 1 <= len(key) <= _MAX_KEYWORD or key != key.strip():
        raise ValueError(f"PNG text keyword must be 1-{_MAX_KEYWORD} characters, unpadded: {key!r}")


def encode_png(
    image: Image.Image,
    *,
    text: Mapping[str, str],
    level: int = PNG_COMPRESS_LEVEL,
    strategy: PngStrategy = "default",
    threads: int = 1,
) -> bytes:
    """Encode ``image`` as PNG with one text chunk per entry of ``text``, in order.

    Latin-1 values go in ``tEXt`` chunks; any other value (a prompt in Japanese, say) goes in
    an uncompressed UTF-8 ``iTXt`` chunk. No timestamp or other varying data is written, so
    the output is a pure function of the pixels and ``text``.

    Args:
        image: The pixels.
        text: Keyword to value; keywords are 1-79 Latin-1 characters.
        level: zlib level, 0 (fastest, largest) to 9 (slowest, smallest).
        strategy: zlib's strategy (:data:`PngStrategy`).
        threads: Above 1, an 8-bit grey, RGB or RGBA image is encoded by
            :func:`_encode_in_parts` on that many threads; the bytes then depend on ``level``,
            ``strategy``, the pixels and ``text``, never on the number of threads.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: A keyword is not a valid PNG keyword.
    """
    info = _text_chunks(text)
    if threads > 1 and image.mode in _COLOR_TYPES:
        return _encode_in_parts(image, info, level, _zlib_strategy(strategy), threads)
    buffer = io.BytesIO()
    image.save(
        buffer,
        format="PNG",
        pnginfo=info,
        compress_level=level,
        compress_type=_STRATEGIES[strategy],
    )
    return buffer.getvalue()


def encode_filtered_png(
    rows: np.ndarray,
    *,
    mode: str,
    text: Mapping[str, str],
    level: int = PNG_COMPRESS_LEVEL,
    strategy: PngStrategy = "default",
    threads: int = 2,
) -> bytes:
    """Encode an image whose rows are already filtered, as :func:`encode_png` does in parts.

    For pixels that were filtered where they were made (a GPU: ``_device_png``): the file is
    byte for byte the one :func:`encode_png` makes of the same pixels with ``threads`` above 1.

    Args:
        rows: ``(height, 1 + width * channels)`` uint8: each row its filter type, then its
            bytes filtered as :func:`_filter_rows` filters them.
        mode: ``L``, ``RGB`` or ``RGBA``.
        text, level, strategy: As for :func:`encode_png`.
        threads: How many rows' parts are deflated at once (the bytes do not depend on it).

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: A keyword is not a valid PNG keyword, or ``rows`` do not fit ``mode``.
    """
    import numpy as np

    if mode not in _COLOR_TYPES:
        raise ValueError(f"filtered rows are encoded for modes {sorted(_COLOR_TYPES)}, not {mode}")
    color_type, channels = _COLOR_TYPES[mode]
    height, stride = rows.shape
    if rows.dtype != np.uint8 or (stride - 1) % channels:
        raise ValueError(f"filtered rows of {rows.dtype} x {stride} do not fit mode {mode}")
    rows_per_part = max(1, PART_BYTES // stride)
    parts = [
        rows[start : start + rows_per_part].tobytes() for start in range(0, height, rows_per_part)
    ]
    width = (stride - 1) // channels
    return _assemble(
        parts,
        width,
        height,
        color_type,
        _text_chunks(text),
        level,
        _zlib_strategy(strategy),
        threads,
    )


def _text_chunks(text: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    """One chunk per entry: ``tEXt`` for Latin-1 values, an uncompressed UTF-8 ``iTXt`` else."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        _check_keyword(key)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value, lang="", tkey="", zip=False)
        else:
            info.add_text(key, value)
    return info


def _zlib_strategy(strategy: PngStrategy) -> int:
    # Pillow's choice for PNG when none is given (src/libImaging/ZipEncode.c: ``Z_FILTERED``).
    return zlib.Z_RLE if strategy == "rle" else zlib.Z_FILTERED


# PNG colour type and bytes per pixel of the 8-bit modes encoded in parts.
_COLOR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}

PART_BYTES = 1 << 18
"""Filtered bytes compressed as one part (whole rows, at least one): fixed, so that the file
does not depend on how many threads made it."""


_WINDOW = 1 << zlib.MAX_WBITS  # how far back deflate may refer: 32 KiB


def _encode_in_parts(
    image: Image.Image, info: PngImagePlugin.PngInfo, level: int, strategy: int, threads: int
) -> bytes:
    """``image`` as PNG, its rows filtered and compressed in parts on ``threads`` threads, with
    the text chunks of ``info`` (made as for Pillow's encoder, so they are the same bytes).

    Each row is filtered as Pillow filters it (:func:`_filter_rows`), so the decompressed image
    data is Pillow's, byte for byte. Every part is deflated on its own, primed with the last
    32 KiB of the part before, and ends on a full flush, the last one with the final block;
    the parts are joined into one zlib stream, as pigz makes its blocks: a standard PNG of
    about the size one stream would make.
    """
    import numpy as np

    color_type, channels = _COLOR_TYPES[image.mode]
    pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * channels)
    rows_per_part = max(1, PART_BYTES // (pixels.shape[1] + 1))
    starts = range(0, image.height, rows_per_part)

    def filtered(start: int) -> bytes:
        above = pixels[start - 1] if start else None
        return _filter_rows(pixels[start : start + rows_per_part], above, channels)

    rows = _map(threads, filtered, starts)
    return _assemble(rows, image.width, image.height, color_type, info, level, strategy, threads)


def _assemble(
    rows: list[bytes],
    width: int,
    height: int,
    color_type: int,
    info: PngImagePlugin.PngInfo,
    level: int,
    strategy: int,
    threads: int,
) -> bytes:
    """The PNG file of filtered ``rows`` (one entry per part): deflated in parts on
    ``threads`` threads, each primed with the end of the part before."""

    compressobj = _rle_compressobj() if strategy == zlib.Z_RLE else zlib.compressobj

    def deflated(index: int) -> bytes:
        # Primed with the end of the part before, as pigz primes its blocks: the stream may
        # refer back into it, since a decoder has just written it, so no part starts cold.
        before = rows[index - 1][-_WINDOW:] if index else b""
        deflate = compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, strategy, before)
        flush = zlib.Z_FINISH if index == len(rows) - 1 else zlib.Z_FULL_FLUSH
        return deflate.compress(rows[index]) + deflate.flush(flush)

    parts = _map(threads, deflated, range(len(rows)))
    checksum = 1
    for part in rows:
        checksum = zlib.adler32(part, checksum)
    out = io.BytesIO(b"\x89PNG\r\n\x1a\n")
    out.seek(0, io.SEEK_END)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    PngImagePlugin.putchunk(out, b"IHDR", header)
    for kind, data, _ in info.chunks:  # text only: no chunk here goes after the image data
        PngImagePlugin.putchunk(out, kind, data)
    adler = struct.pack(">I", checksum)
    PngImagePlugin.putchunk(out, b"IDAT", _zlib_header(level, strategy), *parts, adler)
    PngImagePlugin.putchunk(out, b"IEND", b"")
    return out.getvalue()


def _filter_rows(rows: np.ndarray, above: np.ndarray | None, bpp: int) -> bytes:
    """``rows`` with a filter byte each, chosen as Pillow chooses (src/libImaging/ZipEncode.c,
    after libpng): of None, Up, Sub and Paeth, in that order, the first with the least sum of
    absolute values of the filtered bytes taken as signed. Average is not tried (Pillow tries
    it only with ``optimize``). ``above`` is the row before the first; None: black."""
    import numpy as np

    height, stride = rows.shape
    up = np.empty_like(rows)
    up[0] = 0 if above is None else above
    up[1:] = rows[:-1]
    left = np.zeros_like(rows)
    left[:, bpp:] = rows[:, :-bpp]
    upper_left = np.zeros_like(rows)
    upper_left[:, bpp:] = up[:, :-bpp]
    # Paeth's distances (a: left, b: up, c: upper left); unsigned where no sign is needed.
    pa = np.maximum(up, upper_left) - np.minimum(up, upper_left)  # |b - c|
    pb = np.maximum(left, upper_left) - np.minimum(left, upper_left)  # |a - c|
    pc = np.abs(left.astype(np.int16) + up - 2 * upper_left.astype(np.int16))  # |a + b - 2c|
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upper_left))
    candidates = (rows, rows - up, rows - left, rows - paeth)  # uint8: differences wrap
    # A byte's distance from zero is min(v, 256 - v); 0 - v wraps to 256 - v.
    sums = np.stack([np.minimum(c, 0 - c).sum(axis=1, dtype=np.int64) for c in candidates])
    chosen = sums.argmin(axis=0)  # the first of equal sums, as Pillow keeps the earlier one
    out = np.empty((height, stride + 1), dtype=np.uint8)
    out[:, 0] = np.array([0, 2, 1, 4], dtype=np.uint8)[chosen]
    for index, candidate in enumerate(candidates):
        picked = chosen == index
        out[picked, 1:] = candidate[picked]
    return out.tobytes()


@cache
def _rle_compressobj() -> Callable[..., Any]:
    """zlib-ng's ``compressobj`` (the render extra's ``zlib-ng``, imported on first use).

    Its RLE deflate is zlib's algorithm with a faster search for runs: the same files on the
    photographs and noise measured, made 1.3-1.9x faster (docs/rendering.md#png-encoding); it
    releases the GIL as zlib does, so parts still deflate at once. Only for RLE: at the
    ``default`` strategy zlib-ng's levels trade size for speed otherwise than zlib's (a 1024²
    photograph 7 % larger at level 6), and the level is what sets a file's size here.
    """
    from zlib_ng import zlib_ng

    return zlib_ng.compressobj


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="imagegen-png")


# A forked child (gunicorn's worker) has none of its parent's threads: it makes its own pool.
os.register_at_fork(after_in_child=_pool.cache_clear)


def _map(threads: int, fn: Callable[[int], bytes], items: Iterable[int]) -> list[bytes]:
    """``fn`` over ``items``, in order, on the pool of ``threads`` threads; on this thread
    where the pool refuses new work: the interpreter is exiting while a render's request still
    waits for its PNG (:mod:`imagegen.render._exiting`). The same bytes either way."""
    items = list(items)
    try:
        results = _pool(threads).map(fn, items)  # submits them all: a refusal comes here
    except RuntimeError:  # concurrent.futures' refusal: "cannot schedule new futures after …"
        return [fn(item) for item in items]
    return list(results)


def _zlib_header(level: int, strategy: int) -> bytes:
    """The two bytes zlib starts a stream with for ``level`` and ``strategy`` (zlib's
    deflate.c, ``deflate()``: the level flags are 0 for Huffman-only and RLE or a level below
    2, 1 below 6, 2 at 6, 3 above; the check bits make the pair a multiple of 31)."""
    if strategy >= zlib.Z_HUFFMAN_ONLY or level < 2:
        flags = 0
    elif level < 6:
        flags = 1
    elif level == 6:
        flags = 2
    else:
        flags = 3
    method = 0x78  # deflate, 32 KiB window
    flag = flags << 6
    flag += 31 - ((method << 8) + flag) % 31
    return bytes([method, flag])


def read_png_text(data: bytes) -> dict[str, str]:
    """The text chunks (``tEXt``, ``zTXt`` and ``iTXt``) of a PNG file, keyword to value.

    Raises:
        ValueError: ``data`` is not a PNG file.
    """
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            assert isinstance(image, PngImagePlugin.PngImageFile)
            # ``text`` reads to the end of the file: chunks after the pixels count too.
            return {str(key): str(value) for key, value in image.text.items()}
    except (OSError, SyntaxError) as error:
        raise ValueError(f"not a readable PNG file: {error}") from error
