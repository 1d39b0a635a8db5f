"""An art style for the image, drawn from a shipped list of named styles.

The list is package data (``data/art_styles.json``), read with :mod:`importlib.resources` so it
loads the same from a source checkout and an installed wheel. The draw is a pure function of the
request's seed (see :meth:`PluginContext.rng`): any replica, at any time, gives a
redelivered generation the style it got the first time. No per-process history takes part, so
two different generations may well draw the same style one after the other.

Options: ``style`` forces a style by name (case-insensitive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins._options import invalid_option, option_str

__all__ = ["ArtStyle", "ArtStylePlugin", "load_styles"]


@dataclass(frozen=True)
class ArtStyle:
    """A named art style and what it looks like."""

    name: str
    description: str

    @property
    def fragment(self) -> str:
        """The style as a prompt fragment."""
        return f"{self.name} style, {self.description}"


@cache
def load_styles() -> tuple[ArtStyle, ...]:
    """The shipped art styles, in file order."""
    text = files("imagegen_plugins").joinpath("data/art_styles.json").read_text("utf-8")
    return tuple(
        ArtStyle(name=row["name"], description=row["description"]) for row in json.loads(text)
    )


class ArtStylePlugin:
    """Adds an art style: forced by the ``style`` option or drawn from the request's seed."""

    name = "art_style"
    description = "An art style drawn from a list of named styles; option 'style' forces one."
    blocking = False  # a look-up in memory: runs on the event loop, no thread
    option_names = ("style",)

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings
        self.styles = load_styles()
        self._by_name = {style.name.lower(): style for style in self.styles}

    def contribute(self, context: PluginContext) -> Contribution:
        """The forced or drawn style as a prompt fragment; data ``{"style": name}``."""
        forced = option_str(context.options, self.name, "style")
        if forced is not None:
            style = self._by_name.get(forced.strip().lower())
            if style is None:
                raise invalid_option(self.name, "style", f"unknown art style {forced!r}")
        else:
            style = self._draw(context)
        return Contribution(
            plugin=self.name,
            text=style.fragment,
            data={"style": style.name, "forced": forced is not None},
        )

    def _draw(self, context: PluginContext) -> ArtStyle:
        return context.rng().choice(self.styles)
