"""A batch's pixels made PNG-ready where the pipeline made them: quantised and filtered on the GPU.

With ``IMAGEGEN_PNG_ENCODE_THREADS`` above 1, render's PNG is the encoder in parts
(:func:`imagegen.render.png.encode_png`): every row filtered with the filter Pillow would
choose, then deflated in parts on several threads. On the host the filtering costs about as
much as the deflating (a 1024² image: 35-45 ms of numpy on one core, 31 of zlib at ``rle``);
on the GPU it is a few elementwise kernels over a few megabytes. So on CUDA the pipeline returns its
tensor (``output_type="pt"``), the two steps diffusers' ``numpy_to_pil`` takes and the row
filters run here, and what crosses to the host is the filtered rows: the host only deflates.
The file is byte for byte the one the host's encoder makes of the same pixels (tested on the
CPU, where torch runs the same code).

Importing this module imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imagegen.render.png import _COLOR_TYPES

__all__ = ["FilteredImage", "filter_rows", "filtered_images", "to_uint8"]

MODES = {channels: mode for mode, (_, channels) in _COLOR_TYPES.items()}
"""Channels to the PNG mode the encoder in parts takes (``png``'s own table)."""

# The PNG filter type of each candidate, in the order Pillow tries them: None, Up, Sub, Paeth.
_FILTER_TYPES = (0, 2, 1, 4)


@dataclass(frozen=True)
class FilteredImage:
    """One image's rows, filtered, on the host: what :func:`encode_filtered_png` takes."""

    rows: np.ndarray
    width: int
    height: int
    mode: str


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` in [0, 1] as ``(B, H, W, C)`` uint8, computed as diffusers' ``"pil"``
    output computes it (``VaeImageProcessor.pt_to_numpy`` and ``numpy_to_pil``: float32, times
    255, rounded half to even), so the values are the same to the last bit."""
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


def filter_rows(pixels: torch.Tensor, bpp: int) -> torch.Tensor:
    """Each row of ``(B, H, S)`` uint8 ``pixels`` with its filter type before it, ``(B, H, 1 + S)``.

    The choice is :func:`imagegen.render.png._filter_rows`' (Pillow's, after libpng): of None,
    Up, Sub and Paeth, the first with the least sum of the filtered bytes' distances from zero.
    Each image's first row has black above it.
    """
    up = torch.zeros_like(pixels)
    up[:, 1:] = pixels[:, :-1]
    left = torch.zeros_like(pixels)
    left[..., bpp:] = pixels[..., :-bpp]
    upper_left = torch.zeros_like(pixels)
    upper_left[..., bpp:] = up[..., :-bpp]
    # Paeth's distances, in int16: a (left), b (up), c (upper left).
    a, b, c = left.to(torch.int16), up.to(torch.int16), upper_left.to(torch.int16)
    pa, pb, pc = (b - c).abs(), (a - c).abs(), (a + b - 2 * c).abs()
    del a, b, c  # temporaries go once used: the peak is about 21 times the image's bytes
    paeth = torch.where((pa <= pb) & (pa <= pc), left, torch.where(pb <= pc, up, upper_left))
    del pa, pb, pc
    candidates = torch.stack([pixels, pixels - up, pixels - left, pixels - paeth])  # uint8 wraps
    del up, left, upper_left, paeth
    # A byte's distance from zero is min(v, 256 - v); 0 - v wraps to 256 - v (unsigned: defined).
    sums = torch.stack([torch.minimum(c, 0 - c).sum(dim=-1, dtype=torch.int32) for c in candidates])
    chosen = sums.argmin(dim=0)  # (B, H): the first of equal sums, as Pillow keeps the earlier
    rows = candidates.gather(0, chosen[None, ..., None].expand(1, *pixels.shape))[0]
    types = torch.tensor(_FILTER_TYPES, dtype=torch.uint8, device=pixels.device)[chosen]
    return torch.cat([types[..., None], rows], dim=-1)


def filtered_images(images: torch.Tensor) -> list[FilteredImage] | None:
    """A pipeline's ``(B, C, H, W)`` output as filtered rows on the host; None for channel
    counts the encoder in parts does not take.

    One image at a time: the filter's temporaries peak at about 21 times the image's bytes
    (270 MB for a 2048² image, measured on the CPU), more than a batch's worth of them can
    always be spared at once.
    """
    batch, channels, height, width = images.shape
    mode = MODES.get(channels)
    if mode is None:
        return None
    filtered = []
    for index in range(batch):
        pixels = to_uint8(images[index : index + 1]).reshape(1, height, width * channels)
        rows = filter_rows(pixels, channels)[0].cpu().numpy()
        filtered.append(FilteredImage(rows, width, height, mode))
    return filtered
