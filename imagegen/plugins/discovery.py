"""Finding plugins: the ``imagegen.plugins`` entry points, and the built-ins as a fallback."""

from __future__ import annotations

import contextlib
from importlib.metadata import EntryPoint, entry_points

__all__ = [
    "ENTRY_POINT_GROUP",
    "clash",
    "declarations",
    "declared_variables",
    "discover",
    "distribution_of",
]

ENTRY_POINT_GROUP = "imagegen.plugins"

# The built-ins resolve even from a source checkout that is not pip-installed (no entry points
# registered yet); an installed distribution declaring the same names takes precedence.
_BUILTINS = {
    "time_of_day": "imagegen_plugins.time_of_day:TimeOfDayPlugin",
    "holiday": "imagegen_plugins.holiday:HolidayPlugin",
    "art_style": "imagegen_plugins.art_style:ArtStylePlugin",
    "lora": "imagegen_plugins.lora:LoraPlugin",
    "remote_context": "imagegen_plugins.remote_context:RemoteContextPlugin",
}


def declarations() -> dict[str, list[EntryPoint]]:
    """Every plugin entry point installed in this environment, by name: each distinct one (two
    declaring the same object are one), in ``importlib.metadata``'s order; a built-in's
    fallback where no distribution declares its name.

    A name with more than one is ambiguous (two packages each offering their own ``weather``):
    which one ``importlib.metadata`` lists first depends on the order of ``sys.path`` and of
    the directories' entries, not on anything either package says, so neither is chosen
    (:func:`clash`).
    """
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        declared = found.setdefault(ep.name, [])
        if all(ep.value != other.value for other in declared):
            declared.append(ep)
    for name, value in _BUILTINS.items():
        found.setdefault(name, [EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)])
    return found


def discover() -> dict[str, EntryPoint]:
    """The plugin entry points installed in this environment, built-ins included, by name: the
    first of each name's (:func:`declarations`; an ambiguous name is refused where enabled)."""
    return {name: declared[0] for name, declared in declarations().items()}


def clash(declared: list[EntryPoint]) -> str | None:
    """What is ambiguous about a name with the entry points ``declared`` (:func:`declarations`):
    ``declared by 2 installed packages: a (a.mod:Cls), b (b.mod:Cls); uninstall one``; None
    for a name declared once."""
    if len(declared) < 2:
        return None
    named = sorted((distribution_of(ep) or "imagegen", ep.value) for ep in declared)
    each = ", ".join(f"{distribution} ({value})" for distribution, value in named)
    return f"declared by {len(declared)} installed packages: {each}; uninstall one"


def distribution_of(ep: EntryPoint) -> str | None:
    """The name of the distribution that declares ``ep``; None for the built-in fallbacks."""
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.name)


def declared_variables() -> set[str]:
    """The environment variables the installed plugins say they read: each one's
    ``environment_variables`` (a tuple of names), read from what its entry point names (the
    class, as a rule), which is loaded, never called. A plugin that cannot be loaded, or
    declares something else, declares nothing here; where it is enabled, it is refused with
    its error all the same."""
    found: set[str] = set()
    for declared in declarations().values():
        for ep in declared:
            names: object = ()
            # A plugin's own import failing is said where it is listed or enabled.
            with contextlib.suppress(Exception):
                names = getattr(ep.load(), "environment_variables", ())
            if isinstance(names, (tuple, list)):
                found.update(n.upper() for n in names if isinstance(n, str))
    return found
