"""imagegen: text to image in stages — enhance, render, persist, then derive.

Importing the package is cheap: it imports nothing until a name is first used (the command
line's ``--help`` pays for none of it), and never imports torch or diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagegen.errors import (
        ConfigurationError,
        DependencyUnavailable,
        ImageGenError,
        InternalError,
        InvalidRequest,
        NotFound,
        Overloaded,
    )
    from imagegen.models import (
        Contribution,
        DerivedImage,
        EnhancedPrompt,
        GenerationFailed,
        GenerationRequest,
        LoraHint,
        PersistedImage,
        RenderedImage,
    )
    from imagegen.plugins import PluginSet
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__version__ = "0.1.0"

# Public name → the module that defines it, imported on first use (PEP 562).
_LAZY = {
    "ConfigurationError": "imagegen.errors",
    "DependencyUnavailable": "imagegen.errors",
    "ImageGenError": "imagegen.errors",
    "InternalError": "imagegen.errors",
    "InvalidRequest": "imagegen.errors",
    "NotFound": "imagegen.errors",
    "Overloaded": "imagegen.errors",
    "Contribution": "imagegen.models",
    "DerivedImage": "imagegen.models",
    "EnhancedPrompt": "imagegen.models",
    "GenerationFailed": "imagegen.models",
    "GenerationRequest": "imagegen.models",
    "LoraHint": "imagegen.models",
    "PersistedImage": "imagegen.models",
    "RenderedImage": "imagegen.models",
    "ImageGenService": "imagegen.service",
    "PluginSet": "imagegen.plugins",
    "Settings": "imagegen.settings",
}

__all__ = [
    "ConfigurationError",
    "Contribution",
    "DependencyUnavailable",
    "DerivedImage",
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
    "PluginSet",
    "RenderedImage",
    "Settings",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imagegen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
