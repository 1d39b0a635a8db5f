"""Rendering: the backend contract, PNG encoding, and the diffusers backend.

``import imagegen.render`` stays free of torch: :class:`DiffusersBackend` (which imports torch
and diffusers) is loaded on first access, and so is the PNG encoder (Pillow and numpy), which
persist does not need when it reads what render stored (:mod:`imagegen.render.stored_png`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen.render.base import ProgressCallback, RenderBackend, RenderOutput

if TYPE_CHECKING:
    from imagegen.render.diffusers_backend import DiffusersBackend
    from imagegen.render.png import encode_png, read_png_text

__all__ = [
    "DiffusersBackend",
    "ProgressCallback",
    "RenderBackend",
    "RenderOutput",
    "encode_png",
    "read_png_text",
]


def __getattr__(name: str) -> Any:
    if name == "DiffusersBackend":
        from imagegen.render.diffusers_backend import DiffusersBackend

        return DiffusersBackend
    if name in ("encode_png", "read_png_text"):
        from imagegen.render import png

        return getattr(png, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
