"""Whether a prompt names its own light: the rule the ``time_of_day`` plugin and the
template's dreams share (a scene lit twice contradicts itself).

Here, with the plugin API, not in the enhance package: enhance makes its plugin set before it
is ready, and the enhance package loads the HTTP clients, which readiness does without.
"""

from __future__ import annotations

import re

__all__ = ["names_its_light"]

# Words that set a scene's time of day or its light (English, as the fragments are), plurals
# too ("quiet mornings", "two sunsets"); whole words only ("nightingale" is none). The sky's
# lights (sun, stars, aurora) and a flame's ("lantern-lit") say it as well as a time does; the
# stars only as a sky's ("under the stars", "a sky full of stars", "starry"), not a flag's, a
# film star's or a hotel's. Nor a time in the name of a thing, lit by any light: an evening
# gown, a morning glory, midnight blue, an egg sunny-side-up, a dawn redwood, the Twilight saga.
_OWN_LIGHT = re.compile(
    r"\b(?:(?:dawn(?![\s-]+redwoods?\b)|daybreak|sunrise|morning(?![\s-]+glor(?:y|ies)\b)"
    r"|noon|afternoon|dusk|sunset|sundown|twilight(?![\s-]+sagas?\b)"
    r"|evening(?![\s-]+(?:gowns?|dress(?:es)?|wear)\b)|night|midnight(?![\s-]+blue\b)|moonrise"
    r"|golden[\s-]+hour|blue[\s-]+hour|sunbeam)s?"
    r"|midday|noontime|daylight|daytime|sunlight|sunlit|sunny(?![\s-]+side[\s-]+up\b)"
    r"|sunshine|nightfall|nighttime"
    r"|tonight|overnight|after[\s-]+dark|moonlit|moonlight|starlit|starlight|starry"
    r"|(?:sky|skies)[\s-]+(?:full[\s-]+)?of[\s-]+stars|under[\s-]+(?:the[\s-]+)?stars"
    r"|stars[\s-]+(?:above|overhead)"
    r"|auroras?|(?:northern|southern)[\s-]+lights"
    r"|(?:lantern|candle|lamp|torch|fire)[\s-]?(?:lit|light))\b",
    re.IGNORECASE,
)


def names_its_light(prompt: str | None) -> bool:
    """Whether ``prompt`` says when its scene is or how it is lit (dusk, night, starlit, ...)."""
    return prompt is not None and _OWN_LIGHT.search(prompt) is not None
