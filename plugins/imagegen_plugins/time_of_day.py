"""The light of the hour: morning, afternoon, evening or night in the request's time zone.

A prompt that names its own light ("at dusk", "a moonlit street") keeps it: the plugin then
adds nothing, rather than the clock's light beside the caller's. A dream always gets it, for
the LLM that dreams a subject of its own; the template, where it writes the dream, leaves it out
after a subject that names its own ("an observatory under a sky full of stars";
:func:`imagegen.enhance._template.compose`).
"""

from __future__ import annotations

from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.plugins.light import names_its_light
from imagegen.settings import Settings

__all__ = ["PERIODS", "TimeOfDayPlugin", "names_its_light", "period_of"]

# (first hour, period, prompt fragment), by first hour; hours before 5 are night.
PERIODS: tuple[tuple[int, str, str], ...] = (
    (0, "night", "night scene, moonlight and glowing artificial lights"),
    (5, "morning", "soft morning light, long gentle shadows"),
    (12, "afternoon", "bright afternoon daylight, clear shadows"),
    (17, "evening", "warm evening glow, golden hour light"),
    (21, "night", "night scene, moonlight and glowing artificial lights"),
)


def period_of(hour: int) -> tuple[str, str]:
    """The (period, fragment) of an hour 0-23."""
    current = PERIODS[0]
    for entry in PERIODS:
        if hour >= entry[0]:
            current = entry
    return current[1], current[2]


class TimeOfDayPlugin:
    """Adds the light of the request's hour."""

    name = "time_of_day"
    description = "Light of the hour (morning, afternoon, evening, night) in the request's zone."
    blocking = False  # a look-up in memory: runs on the event loop, no thread
    option_names = ()  # none: an option given for it is refused

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    def contribute(self, context: PluginContext) -> Contribution | None:
        """The period of ``context.now`` and its light; none for a prompt naming its own."""
        if names_its_light(context.prompt):
            return None
        period, text = period_of(context.now.hour)
        return Contribution(
            plugin=self.name,
            text=text,
            data={"period": period, "hour": context.now.hour, "timezone": context.timezone},
        )
