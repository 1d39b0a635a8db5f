"""imagegen: text to image in three stages — enhance, render, persist.

Importing the package is cheap: it never imports torch or diffusers, and loads the service
module only when :class:`ImageGenService` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen.errors import (
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
)
from imagegen.models import (
    Contribution,
    EnhancedPrompt,
    GenerationFailed,
    GenerationRequest,
    LoraHint,
    PersistedImage,
    RenderedImage,
)
from imagegen.settings import Settings

if TYPE_CHECKING:
    from imagegen.service import ImageGenService

__version__ = "0.1.0"

__all__ = [
    "Contribution",
    "DependencyUnavailable",
    "EnhancedPrompt",
    "GenerationFailed",
    "GenerationRequest",
    "ImageGenError",
    "ImageGenService",
    "InternalError",
    "InvalidRequest",
    "LoraHint",
    "NotFound",
    "Overloaded",
    "PersistedImage",
    "RenderedImage",
    "Settings",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "ImageGenService":
        from imagegen.service import ImageGenService

        return ImageGenService
    raise AttributeError(f"module 'imagegen' has no attribute {name!r}")
