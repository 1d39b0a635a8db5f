"""Prompts written without an LLM: the fallback template and the pass-through.

Both are pure functions of their inputs, so a redelivered request gets the same prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from imagegen.enhance._text import fit_budget, join_fragments
from imagegen.models import Contribution
from imagegen.modelspec import ModelFamily

__all__ = ["DREAM_SUBJECTS", "compose", "dream_subject"]

# Subjects for a request without a prompt when no LLM can dream one.
DREAM_SUBJECTS: tuple[str, ...] = (
    "a lighthouse on a rocky coast",
    "a quiet mountain village above the clouds",
    "a fox curled up in a snowy forest",
    "an old library with towering bookshelves",
    "a koi pond in a Japanese garden",
    "a hot air balloon drifting over a valley",
    "a cozy cabin beside a frozen lake",
    "a bustling night market full of lanterns",
    "a red tram climbing a steep city street",
    "an astronaut tending a greenhouse on Mars",
    "a whale swimming beneath the northern lights",
    "a windmill among fields of tulips",
    "a cat asleep on a sunny windowsill",
    "a sailing ship in a stormy sea",
    "a treehouse in an ancient oak",
    "a desert caravan crossing golden dunes",
    "a waterfall hidden in a tropical jungle",
    "a steam locomotive crossing a stone viaduct",
    "a bakery window full of fresh bread",
    "an owl perched on a moss-covered branch",
    "a floating island with a small castle",
    "a harbour town with colourful houses",
    "a robot watering flowers on a balcony",
    "a field of sunflowers under a wide sky",
    "a glass conservatory full of rare plants",
    "a mountain lake reflecting snowy peaks",
    "a vintage car parked by a seaside diner",
    "a dragon sleeping on a pile of books",
    "a rainy alley with glowing shop signs",
    "a herd of horses running along a beach",
    "a rooftop garden above a busy city",
    "a lonely tree on a windswept hill",
    "a coral reef teeming with fish",
    "a clockmaker's workshop full of gears",
    "a stone bridge over a misty river",
    "a monastery perched on a cliff",
    "a child flying a kite on a meadow",
    "a bowl of ramen on a wooden counter",
    "a polar bear on drifting sea ice",
    "an abandoned greenhouse reclaimed by vines",
    "a canal in Venice at high tide",
    "a giant tortoise walking through ferns",
    "a snow-covered train station",
    "a lavender field with a stone farmhouse",
    "a musician playing violin on a street corner",
    "a hummingbird hovering at a flower",
    "an observatory under a sky full of stars",
    "a fishing boat returning to harbour",
    "a terraced rice field in the hills",
    "a city skyline seen from a ferry",
    "a fairy ring of mushrooms in a forest",
    "a chess game in a sunlit park",
    "a volcano glowing beside a calm sea",
    "a paper boat sailing down a gutter stream",
    "a market stall piled with ripe fruit",
    "a deer standing in a foggy clearing",
    "a spiral staircase in an old tower",
    "a lantern-lit boat on a quiet river",
    "a penguin colony on an icy shore",
    "a cottage garden in full bloom",
)


def dream_subject(seed: int) -> str:
    """A subject from :data:`DREAM_SUBJECTS`, chosen by ``seed``."""
    return random.Random(seed).choice(DREAM_SUBJECTS)


def compose(subject: str, contributions: Sequence[Contribution], spec: ModelFamily) -> str:
    """``subject`` then each plugin's fragment, within ``spec``'s budget.

    The subject is kept whole (it is the caller's); trailing fragments go first when over budget.
    """
    prompt = join_fragments([subject, *(c.text for c in contributions)])
    return fit_budget(prompt, spec, subject=False)
