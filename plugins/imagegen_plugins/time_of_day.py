"""The light of the hour: morning, afternoon, evening or night in the request's time zone.

A prompt that names its own light ("at dusk", "a moonlit street") keeps it: the plugin then
adds nothing, rather than the clock's light beside the caller's. So does a dream whose subject,
as the fallback template draws it (``context.subject``), names its own ("an observatory under a
sky full of stars").
"""

from __future__ import annotations

import re

from imagegen.models import Contribution
from imagegen.plugins import PluginContext
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


# Words that set a scene's time of day or its light (English, as the fragments are), plurals
# too ("quiet mornings", "two sunsets"); whole words only ("nightingale" is none). The sky's
# lights (sun, stars, aurora) and a flame's ("lantern-lit") say it as well as a time does.
_OWN_LIGHT = re.compile(
    r"\b(?:(?:dawn|daybreak|sunrise|morning|noon|afternoon|dusk|sunset|sundown|twilight"
    r"|evening|night|midnight|moonrise|golden[\s-]+hour|blue[\s-]+hour|sunbeam)s?"
    r"|midday|noontime|daylight|daytime|sunlight|sunlit|sunny|sunshine|nightfall|nighttime"
    r"|tonight|overnight|after[\s-]+dark|moonlit|moonlight|starlit|starlight|starry|stars"
    r"|auroras?|(?:northern|southern)[\s-]+lights"
    r"|(?:lantern|candle|lamp|torch|fire)[\s-]?(?:lit|light))\b",
    re.IGNORECASE,
)


def names_its_light(prompt: str | None) -> bool:
    """Whether ``prompt`` says when its scene is (dusk, night, ...)."""
    return prompt is not None and _OWN_LIGHT.search(prompt) is not None


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
        """The period of ``context.now`` and its light; none for a subject naming its own."""
        if names_its_light(context.subject):
            return None
        period, text = period_of(context.now.hour)
        return Contribution(
            plugin=self.name,
            text=text,
            data={"period": period, "hour": context.now.hour, "timezone": context.timezone},
        )
