"""The errors the diffusers backend raises, with one-line messages. Free of torch."""

from __future__ import annotations

from imagegen.errors import InvalidRequest

__all__ = ["INSTALL_HINT", "field_error", "first_line"]

INSTALL_HINT = "pip install 'imagegen[render]'"


def field_error(field: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` naming ``field``."""
    return InvalidRequest(message, errors=[{"field": field, "message": message}])


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
