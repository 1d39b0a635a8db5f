"""Prompts written without an LLM: the fallback template and the pass-through.

Both are pure functions of their inputs, so a redelivered request gets the same prompt.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from imagegen.enhance._text import fit_budget, join_fragments
from imagegen.models import Contribution
from imagegen.modelspec import ModelFamily
from imagegen.plugins.light import names_its_light

__all__ = [
    "DREAM_SUBJECTS",
    "HOLIDAY_PLUGIN",
    "LIGHT_PLUGIN",
    "SEASONAL_SUBJECTS",
    "SOUTHERN_COUNTRIES",
    "compose",
    "dream_countries",
    "dream_subject",
    "in_southern_hemisphere",
    "names_its_light",
    "season_of",
]

# Subjects for a request without a prompt when no LLM can dream one. Grammatical phrases that
# name no season and, but for the few that name their own light ("night", "a sky full of
# stars", "lantern-lit": the template then leaves out the clock's), no time of day.
_ANY_SEASON: tuple[str, ...] = (
    "a lighthouse on a rocky coast",
    "a quiet mountain village above the clouds",
    "an old library with towering bookshelves",
    "a koi pond in a Japanese garden",
    "a hot air balloon drifting over a valley",
    "a bustling night market full of lanterns",
    "a red tram climbing a steep city street",
    "an astronaut tending a greenhouse on Mars",
    "a cat asleep on a windowsill among potted plants",
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
    "a glass conservatory full of rare plants",
    "a mountain lake reflecting jagged peaks",
    "a vintage car parked by a seaside diner",
    "a dragon sleeping on a pile of books",
    "a rainy alley crowded with shop signs",
    "a herd of horses running along a beach",
    "a rooftop garden above a busy city",
    "a lonely tree on a windswept hill",
    "a coral reef teeming with fish",
    "a clockmaker's workshop full of gears",
    "a stone bridge over a misty river",
    "a monastery perched on a cliff",
    "a child flying a kite over a meadow",
    "a bowl of ramen on a wooden counter",
    "an abandoned greenhouse reclaimed by vines",
    "a canal in Venice at high tide",
    "a giant tortoise walking through ferns",
    "a musician playing violin on a street corner",
    "a hummingbird hovering beside a red flower",
    "an observatory under a sky full of stars",
    "a fishing boat returning to harbour",
    "a terraced rice field in the hills",
    "a city skyline seen from a ferry",
    "a chess game in a leafy park",
    "a volcano smoking beside a calm sea",
    "a paper boat sailing down a gutter stream",
    "a market stall piled with ripe fruit",
    "a deer standing in a foggy clearing",
    "a spiral staircase in an old tower",
    "a lantern-lit boat on a quiet river",
    "a samurai crossing a wooden bridge",
    "a giraffe peering over an acacia tree",
    "a flock of flamingos wading in a salt lake",
    "a sea turtle gliding over a kelp forest",
    "an underwater city inside a glass dome",
    "a steampunk airship moored to a tower",
    "a blacksmith hammering at his forge",
    "a potter shaping clay on a wheel",
    "a spice market piled with coloured powders",
    "a red panda napping in a bamboo grove",
    "a space station orbiting a ringed planet",
    "a retro diner with a checkered floor",
    "a pirate ship anchored in a turquoise lagoon",
    "a wizard's tower on a rocky island",
    "a herd of elephants crossing a river",
    "a wooden pier stretching into a calm lake",
    "a cable car above a deep gorge",
    "an ancient temple overgrown by the jungle",
    "a snail climbing a rain-soaked leaf",
    "a crowded train platform in Tokyo",
    "a lone cyclist on a winding coastal road",
    "a carousel in an empty amusement park",
    "a bonsai tree on a stone table",
    "a secondhand bookshop with stacked shelves",
    "a mechanical owl with brass feathers",
    "a herd of bison on an open prairie",
    "a tea house on a mountain pass",
    "turquoise thermal pools terraced into a hillside",
    "a giant octopus wrapped around a shipwreck",
    "a castle on an island in a Scottish loch",
    "a row of beach huts on a pebble shore",
    "an artist's studio cluttered with canvases",
    "a kingfisher diving into a stream",
    "a Viking longship sailing up a fjord",
    "a desert oasis ringed by palm trees",
    "a futuristic city with hanging gardens",
    "a woodland cottage with a thatched roof",
    "a family of otters playing in a river",
    "an alchemist's laboratory full of glass flasks",
    "a moose wading through a misty lake",
    "a cliffside village above a turquoise sea",
    "a ruined abbey with ivy-clad arches",
    "a submarine exploring a deep-sea trench",
    "a diver among drifting jellyfish",
    "a street food stall frying dumplings",
    "a rope bridge across a jungle canyon",
    "a chameleon on a twisting branch",
    "a tiny village inside a hollow tree",
    "a grand piano in an empty ballroom",
    "a vintage typewriter on a cluttered desk",
    "a stone circle on a grassy moor",
    "an orangutan in the rainforest canopy",
    "a floating market on a Thai canal",
    "a Roman aqueduct spanning a green valley",
)

# Subjects that belong to a season (meteorological: winter is December to February in the
# northern hemisphere, June to August in the southern), drawn only in their own.
SEASONAL_SUBJECTS: dict[str, tuple[str, ...]] = {
    "winter": (
        "a fox curled up in a snowy forest",
        "a cozy cabin beside a frozen lake",
        "a snow-covered train station",
        "a polar bear on drifting sea ice",
        "a penguin colony on an icy shore",
        "a whale swimming beneath the northern lights",
        "skaters on a frozen canal lined with old houses",
    ),
    "spring": (
        "a windmill among fields of tulips",
        "cherry blossoms over a temple path",
        "newborn lambs in a green spring meadow",
        "a bluebell wood beside a stream",
        "ducklings following their mother across a pond",
        "an orchard in white blossom",
    ),
    "summer": (
        "a field of sunflowers under a wide sky",
        "a lavender field with a stone farmhouse",
        "a cottage garden in full bloom",
        "a beach crowded with striped umbrellas",
        "children jumping from a jetty into a summer lake",
        "a meadow of poppies beside a country lane",
    ),
    "autumn": (
        "a fairy ring of mushrooms in a forest",
        "a forest path under red and gold autumn leaves",
        "a pumpkin patch beside a red barn",
        "an orchard at apple harvest",
        "a squirrel burying acorns among fallen leaves",
        "geese flying over autumn marshes",
    ),
}

DREAM_SUBJECTS: tuple[str, ...] = _ANY_SEASON + tuple(
    subject for subjects in SEASONAL_SUBJECTS.values() for subject in subjects
)

# Countries and territories the holidays library lists that lie mostly south of the equator,
# by land area: where every holiday country is one of them, the dreams' seasons are the southern
# hemisphere's. So Indonesia, Ecuador, Gabon and the two Congos are in, the equator crossing
# them nearer their north; Kenya, the Maldives and Kiribati (Kiritimati, the Gilberts' north)
# are not. Each by its ISO 3166 alpha-2 and alpha-3 code, and the library's own alpha-3 where
# it differs (SZW, VTU): the codes the holiday plugin reads.
SOUTHERN_COUNTRIES = frozenset(
    {
        *("AO", "AQ", "AR", "AS", "AU", "BI", "BO", "BR", "BV", "BW", "CC", "CD", "CG", "CK"),
        *("CL", "CX", "EC", "FJ", "FK", "GA", "GS", "HM", "ID", "IO", "KM", "LS", "MG", "MU"),
        *("MW", "MZ", "NA", "NC", "NF", "NR", "NU", "NZ", "PE", "PF", "PG", "PN", "PY", "RE"),
        *("RW", "SB", "SC", "SH", "SZ", "TF", "TK", "TL", "TO", "TV", "TZ", "UY", "VU", "WF"),
        *("WS", "YT", "ZA", "ZM", "ZW"),
        *("AGO", "ARG", "ASM", "ATA", "ATF", "AUS", "BDI", "BOL", "BRA", "BVT", "BWA", "CCK"),
        *("CHL", "COD", "COG", "COK", "COM", "CXR", "ECU", "FJI", "FLK", "GAB", "HMD", "IDN"),
        *("IOT", "LSO", "MDG", "MOZ", "MUS", "MWI", "MYT", "NAM", "NCL", "NFK", "NIU", "NRU"),
        *("NZL", "PCN", "PER", "PNG", "PRY", "PYF", "REU", "RWA", "SGS", "SHN", "SLB", "SWZ"),
        *("SYC", "SZW", "TKL", "TLS", "TON", "TUV", "TZA", "URY", "VTU", "VUT", "WLF", "WSM"),
        *("ZAF", "ZMB", "ZWE"),
    }
)

# By month, January first.
_NORTHERN_SEASONS: tuple[str, ...] = (
    *("winter",) * 2,
    *("spring",) * 3,
    *("summer",) * 3,
    *("autumn",) * 3,
    "winter",
)
_OPPOSITE = {"winter": "summer", "spring": "autumn", "summer": "winter", "autumn": "spring"}

# Any two ticks of a schedule less than this many quarter-hours apart dream different subjects
# across midnight too (within one day none repeats). The day's first _APART subjects avoid the
# previous day's last _APART, which are found from that day's drawn order alone (its own head is
# moved, its tail never is), so no day depends on the whole history before it. Moving the head
# shifts places up to 2 * _APART, short of the tail of the shortest day: 3 * _APART is at most
# _SHORTEST_DAY.
_APART = 28
_SLOT = timedelta(minutes=15)
# Quarter-hours in the longest and the shortest day: 26 and 22 hours where a clock moves by two
# hours (Antarctica/Troll, between +00 and +02), 25 and 23 where it moves by one.
_LONGEST_DAY = 104
_SHORTEST_DAY = 88
# A request this soon after its quarter-hour began is taken for the schedule's tick.
_ON_THE_TICK = timedelta(minutes=1)


LIGHT_PLUGIN = "time_of_day"
"""The plugin whose fragment is the clock's light: the template leaves it out after a subject
that names its own (:func:`compose`)."""

HOLIDAY_PLUGIN = "holiday"
"""The plugin whose ``countries`` option overrides ``IMAGEGEN_HOLIDAY_COUNTRIES``: a dream's
hemisphere follows the countries it reads (:func:`dream_countries`)."""


def dream_countries(configured: Iterable[str], options: Mapping[str, Any]) -> list[str]:
    """The holiday countries a dream's hemisphere follows, those the holiday plugin reads.

    Args:
        configured: ``IMAGEGEN_HOLIDAY_COUNTRIES``.
        options: The holiday plugin's options, merged as it runs with them (the request's
            ``plugin_options`` over the operator's): their ``countries``, a list of text or
            comma-separated text as ``option_list`` in ``imagegen_plugins._options`` reads it,
            stand for ``configured``. A value the plugin refuses is left aside here: its
            refusal answers the request.
    """
    given = options.get("countries")
    if isinstance(given, str):
        return [code.strip() for code in given.split(",") if code.strip()]
    if isinstance(given, list) and all(isinstance(code, str) for code in given):
        return [code.strip() for code in given if code.strip()]
    return list(configured)


def in_southern_hemisphere(countries: Iterable[str]) -> bool:
    """Whether every one of ``countries`` (``AU``, ``au-nsw``) is a southern one; False for none."""
    codes = [code.strip().upper().partition("-")[0] for code in countries]
    return bool(codes) and all(code in SOUTHERN_COUNTRIES for code in codes)


def season_of(day: date, *, southern: bool = False) -> str:
    """The meteorological season of ``day``'s month in the given hemisphere."""
    season = _NORTHERN_SEASONS[day.month - 1]
    return _OPPOSITE[season] if southern else season


def _eligible(day: date, in_south: bool) -> tuple[str, ...]:
    return _ANY_SEASON + SEASONAL_SUBJECTS[season_of(day, southern=in_south)]


def _drawn(day: date, in_south: bool) -> list[str]:
    """``day``'s subjects in an order drawn from the date alone."""
    key = f"dream:{day.isoformat()}:{'south' if in_south else 'north'}"
    digest = hashlib.sha256(key.encode()).digest()
    order = list(_eligible(day, in_south))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


@functools.lru_cache(maxsize=64)
def _day_order(day: date, in_south: bool, slots_before: int) -> tuple[str, ...]:
    """``day``'s subjects, one per quarter-hour since its midnight.

    The drawn order with its first :data:`_APART` places taken by the first subjects that the
    previous day's last :data:`_APART` slots (of its ``slots_before``, clamped to a day's
    bounds) did not show, the others kept in order: a place from ``2 * _APART`` on keeps its
    drawn subject, so the previous day's tail is read from its drawn order.
    """
    order = _drawn(day, in_south)
    before = _drawn(day - timedelta(days=1), in_south)
    end = min(max(slots_before, _SHORTEST_DAY), _LONGEST_DAY)
    shown = set(before[end - _APART : end])
    head = [subject for subject in order if subject not in shown][:_APART]
    taken = set(head)
    return (*head, *(subject for subject in order if subject not in taken))


def dream_subject(seed: int, when: datetime, countries: Iterable[str] = ()) -> str:
    """The subject the template dreams for a request with ``seed`` at ``when``.

    A pure function of its arguments, so a redelivered request dreams the same. A schedule
    (a PingSource every 15 minutes, hourly, every 3 hours) cycles through the subjects: the
    subjects of ``when``'s local date and season (in ``when``'s zone; the southern hemisphere's
    where every one of ``countries`` is a southern country) in an order drawn from that date,
    one per quarter-hour since its midnight, so none repeats within a day, nor within
    :data:`_APART` quarter-hours across midnight. A request more than a minute into its
    quarter-hour is no tick: its ``seed`` draws one of the day's others.

    Args:
        seed: The generation's seed.
        when: The request's time, aware, in the zone whose date and hour it follows.
        countries: The holiday countries the request's holiday plugin reads
            (:func:`dream_countries`).
    """
    day = when.date()
    midnight = datetime.combine(day, time(), tzinfo=when.tzinfo)
    before = datetime.combine(day - timedelta(days=1), time(), tzinfo=when.tzinfo)
    # The previous day's slots, as its own are counted (its last one may be cut short).
    slots_before = -(-(midnight.astimezone(UTC) - before.astimezone(UTC)) // _SLOT)
    order = _day_order(day, in_southern_hemisphere(countries), slots_before)
    # Elapsed time, not the wall clock: a day the clock goes back an hour has 100 quarter-hours.
    elapsed = max(when.astimezone(UTC) - midnight.astimezone(UTC), timedelta())
    slot, into = divmod(elapsed, _SLOT)
    if into < _ON_THE_TICK:
        return order[slot % len(order)]
    return order[(slot + 1 + seed % (len(order) - 1)) % len(order)]


def compose(subject: str, contributions: Sequence[Contribution], spec: ModelFamily) -> str:
    """``subject`` then each plugin's fragment, within ``spec``'s budget.

    The subject is kept whole (it is the caller's); trailing fragments go first when over budget.
    The clock's light (:data:`LIGHT_PLUGIN`'s fragment) is left out after a subject that names
    its own ("a bustling night market"), rather than a second light beside it: the plugin
    gives it to a dream all the same, for an LLM that dreams a subject of its own.
    """
    own_light = names_its_light(subject)
    fragments = [c.text for c in contributions if not (own_light and c.plugin == LIGHT_PLUGIN)]
    prompt = join_fragments([subject, *fragments])
    return fit_budget(prompt, spec, subject=False)
