"""PNG encoding with text chunks: what was drawn, from which seed, by which model.

Pillow only, so persist and the CLI can read the chunks back without torch.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from typing import Literal

from PIL import Image, PngImagePlugin

__all__ = ["PNG_COMPRESS_LEVEL", "PngStrategy", "encode_png", "read_png_text"]

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

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: A keyword is not a valid PNG keyword.
    """
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        _check_keyword(key)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value, lang="", tkey="", zip=False)
        else:
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(
        buffer,
        format="PNG",
        pnginfo=info,
        compress_level=level,
        compress_type=_STRATEGIES[strategy],
    )
    return buffer.getvalue()


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
