"""Reading plugin options, with errors that name the offending option."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagegen.errors import InvalidRequest

__all__ = ["invalid_option", "option_float", "option_list", "option_str"]


def invalid_option(plugin: str, key: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` naming ``plugin_options.<plugin>.<key>``."""
    field = f"plugin_options.{plugin}.{key}"
    return InvalidRequest(f"{field}: {message}", errors=[{"field": field, "message": message}])


def option_float(
    options: Mapping[str, Any], plugin: str, key: str, default: float, *, low: float, high: float
) -> float:
    """A number option within [low, high]."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_option(plugin, key, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise invalid_option(plugin, key, f"must be a number, got {value!r}") from None
    if not low <= number <= high:
        raise invalid_option(plugin, key, f"must be between {low} and {high}, got {number}")
    return number


def option_str(options: Mapping[str, Any], plugin: str, key: str) -> str | None:
    """A text option, or None when absent or empty."""
    value = options.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid_option(plugin, key, f"must be text, got {value!r}")
    return value


def option_list(options: Mapping[str, Any], plugin: str, key: str) -> list[str] | None:
    """A list option given as a list of text or comma-separated text; None when absent."""
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value if item.strip()]
    raise invalid_option(plugin, key, f"must be a list of text, got {value!r}")
