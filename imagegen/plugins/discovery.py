"""Finding plugins: the ``imagegen.plugins`` entry points, and the built-ins as a fallback."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points

__all__ = ["ENTRY_POINT_GROUP", "discover", "distribution_of"]

ENTRY_POINT_GROUP = "imagegen.plugins"

logger = logging.getLogger("imagegen.plugins")

# The built-ins resolve even from a source checkout that is not pip-installed (no entry points
# registered yet); an installed distribution declaring the same names takes precedence.
_BUILTINS = {
    "time_of_day": "imagegen_plugins.time_of_day:TimeOfDayPlugin",
    "holiday": "imagegen_plugins.holiday:HolidayPlugin",
    "art_style": "imagegen_plugins.art_style:ArtStylePlugin",
    "lora": "imagegen_plugins.lora:LoraPlugin",
    "remote_context": "imagegen_plugins.remote_context:RemoteContextPlugin",
}


def discover() -> dict[str, EntryPoint]:
    """The plugin entry points installed in this environment, built-ins included, by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            logger.warning(
                "plugin %s is declared twice (%s, %s); using the first",
                ep.name,
                found[ep.name].value,
                ep.value,
            )
            continue
        found.setdefault(ep.name, ep)
    for name, value in _BUILTINS.items():
        found.setdefault(name, EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP))
    return found


def distribution_of(ep: EntryPoint) -> str | None:
    """The name of the distribution that declares ``ep``; None for the built-in fallbacks."""
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.name)
