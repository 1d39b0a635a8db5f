"""Rendering: the backend contract, PNG encoding, and the diffusers backend.

``import imagegen.render`` stays free of torch: :class:`DiffusersBackend` (which imports torch
and diffusers) is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen.render.base import ProgressCallback, RenderBackend, RenderOutput
from imagegen.render.png import encode_png, read_png_text

if TYPE_CHECKING:
    from imagegen.render.diffusers_backend import DiffusersBackend

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
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
