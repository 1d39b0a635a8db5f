"""The errors the diffusers backend raises, with one-line messages. Free of torch."""

from __future__ import annotations

from imagegen.errors import InvalidRequest, first_line

__all__ = ["INSTALL_HINT", "field_error", "first_line"]

INSTALL_HINT = (
    "pip install 'imagegen[render]'"
    " (in a checkout: pip install -e '.[render]'; docs/development.md)"
)
"""How to install the render extra, for an installed package and for a checkout alike: pip
installs an installed distribution's extra without reinstalling it. On Linux PyPI's torch is the
CUDA build, hence the page (the CPU build first)."""


def field_error(field: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` naming ``field``."""
    return InvalidRequest(message, errors=[{"field": field, "message": message}])
