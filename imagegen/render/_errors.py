"""The errors the diffusers backend raises, with one-line messages. Free of torch."""

from __future__ import annotations

from imagegen.errors import InvalidRequest, first_line

__all__ = ["INSTALL_HINT", "field_error", "first_line"]

INSTALL_HINT = "pip install 'imagegen[render]'"


def field_error(field: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` naming ``field``."""
    return InvalidRequest(message, errors=[{"field": field, "message": message}])
