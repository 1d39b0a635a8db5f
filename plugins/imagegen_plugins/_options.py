"""Reading plugin options, with errors that name the offending option."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.settings import Settings

__all__ = ["invalid_option", "invalid_setting", "option_float", "option_list", "option_str"]


def invalid_option(plugin: str, key: str, message: str) -> InvalidRequest:
    """An :class:`InvalidRequest` naming ``plugin_options.<plugin>.<key>``."""
    field = f"plugin_options.{plugin}.{key}"
    return InvalidRequest(f"{field}: {message}", errors=[{"field": field, "message": message}])


def invalid_setting(settings: Settings, refused: InvalidRequest) -> ConfigurationError:
    """``refused`` (:func:`invalid_option`) as the operator's fault: for an option a plugin reads
    from the settings only, whatever a request gives. A 503 naming the setting, as the plugin
    set answers for any operator's option a plugin refuses."""
    variable = settings.variable("plugin_options")
    said = [f"{e['field']}: {e['message']}" for e in refused.errors]
    return ConfigurationError(
        f"invalid settings: {variable} ({'; '.join(said)})",
        errors=[{"field": variable, "message": message} for message in said],
    )


def _shown(value: Any, limit: int = 32) -> str:
    """``value`` as a message quotes it, cut short: a request's number may have any length."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def option_float(
    options: Mapping[str, Any], plugin: str, key: str, default: float, *, low: float, high: float
) -> float:
    """A finite number option within [low, high]."""
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise invalid_option(plugin, key, f"must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    except OverflowError:  # an integer too large for a float (JSON's have any length)
        number = math.inf
    if math.isnan(number):
        raise invalid_option(plugin, key, f"must be a number, got {_shown(value)}")
    if not low <= number <= high:
        raise invalid_option(plugin, key, f"must be between {low} and {high}, got {_shown(value)}")
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
