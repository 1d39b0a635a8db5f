"""time_of_day: the period of the request's hour, in the request's zone."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from imagegen import models
from imagegen.enhance._template import dream_subject
from imagegen.errors import InvalidRequest
from imagegen.models import GenerationRequest
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from imagegen.validation import parse_model
from imagegen_plugins.time_of_day import TimeOfDayPlugin, names_its_light, period_of


@pytest.mark.parametrize(
    ("hour", "period"),
    [
        (0, "night"),
        (4, "night"),
        (5, "morning"),
        (11, "morning"),
        (12, "afternoon"),
        (16, "afternoon"),
        (17, "evening"),
        (20, "evening"),
        (21, "night"),
        (23, "night"),
    ],
)
def test_periods(hour: int, period: str) -> None:
    assert period_of(hour)[0] == period


async def test_uses_the_request_zone(settings: Settings) -> None:
    plugins = PluginSet([TimeOfDayPlugin(settings)], settings=settings)
    now = datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
    fox = "a red fox"  # a subject that names no light of its own
    [utc] = await plugins.run(generation_id="g", seed=1, now=now, prompt=fox)
    [la] = await plugins.run(
        generation_id="g", seed=1, now=now, prompt=fox, timezone="America/Los_Angeles"
    )
    assert utc.data == {"period": "morning", "hour": 7, "timezone": "UTC"}
    assert "morning light" in utc.text
    assert la.data["period"] == "night" and la.data["hour"] == 0
    assert "night" in la.text


@pytest.mark.parametrize(
    ("prompt", "kept"),
    [
        ("a lighthouse on a cliff at dusk", True),
        ("a MOONLIT street", True),
        ("the golden hour over a lake", True),
        ("a lighthouse on a cliff", False),
        # Plurals and compounds: "bright afternoon daylight" was added to each of these.
        ("a harbour at nightfall", True),
        ("rainy nights in Tokyo", True),
        ("two sunsets over Tatooine", True),
        ("quiet mornings by the sea", True),
        ("a city after dark", True),
        ("a sunlit meadow", True),
        ("a street lit by starlight", True),
        ("a nightingale on a branch", False),  # a word that only begins like one
        ("a mornington crescent sign", False),
        ("a sunsetter awning", False),
        # The sky's lights and a flame's say when a scene is, as a time does.
        ("a cat asleep on a sunny windowsill", True),
        ("an observatory under a sky full of stars", True),
        ("a whale beneath the northern lights", True),
        ("a lantern-lit boat on a river", True),
        ("a candlelit dinner", True),
        ("a starfish on the sand", False),
        ("a lamplighter's ladder", False),
        # Stars as a sky's light, not a flag's, a film's or a hotel's.
        ("campers asleep under the stars", True),
        ("a desert with stars overhead", True),
        ("a starry harbour", True),
        ("an American flag with its stars and stripes", False),
        ("two Hollywood stars posing on a red carpet", False),
        ("a five stars hotel lobby", False),
        # A time in the name of a thing, not of the scene's light.
        ("a woman in an evening gown", False),
        ("evening-dresses in a shop window", False),
        ("a morning glory on a fence", False),
        ("morning glories climbing a trellis", False),
        ("a midnight blue vintage car", False),
        ("a midnight-blue velvet armchair", False),
        ("two eggs sunny-side-up in a skillet", False),
        ("eggs sunny side up", False),
        ("a dawn redwood grove", False),
        ("a poster of the Twilight saga", False),
        ("an evening gown at dusk", True),  # the light is named beside it
        ("dawn over a redwood grove", True),
        ("a quiet evening by the lake", True),
        ("a midnight snack", True),
    ],
)
async def test_a_prompt_naming_its_own_light_keeps_it(
    settings: Settings, prompt: str | None, kept: bool
) -> None:
    plugins = PluginSet([TimeOfDayPlugin(settings)], settings=settings)
    now = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
    found = await plugins.run(generation_id="g", seed=1, now=now, prompt=prompt)
    assert (found == []) is kept, found


async def test_a_dream_is_given_the_light_of_the_hour(settings: Settings) -> None:
    """Whatever the template's subject: an LLM dreams a subject of its own, and the template
    leaves the light out after one naming its own (tests/enhance/test_dreams.py)."""
    plugins = PluginSet([TimeOfDayPlugin(settings)], settings=settings)
    day = datetime(2026, 6, 1, tzinfo=UTC)
    own_light = 0
    for quarter in range(96):
        now = day + timedelta(minutes=15 * quarter)
        own_light += names_its_light(dream_subject(quarter, now, settings.holiday_countries))
        [found] = await plugins.run(generation_id="g", seed=quarter, now=now)
        assert found.text == period_of(now.hour)[1]
    assert own_light  # the day drew subjects naming their light, and each got the hour's


@pytest.mark.parametrize("zone", ["localtime", "posix/Asia/Tokyo", "right/UTC", "Factory"])
def test_a_hosts_own_zone_names_are_no_time_zone(zone: str) -> None:
    """``ZoneInfo`` opens them where the host has the file (the host's clock, copies of the
    zones, the database's placeholder): an hour that differs from host to host."""
    with pytest.raises(InvalidRequest) as caught:
        parse_model(GenerationRequest, {"timezone": zone})
    assert caught.value.fields == ["timezone"] and caught.value.status == 400
    with pytest.raises(ValidationError, match="unknown IANA time zone"):
        Settings(timezone=zone)


def test_iana_zones_are_time_zones_and_listed_only_when_needed() -> None:
    """Listing the zones reads the tz folders: not for the default zone (every start-up)."""
    models._iana_zones.cache_clear()
    assert Settings(timezone="UTC").timezone == "UTC"
    assert models._iana_zones.cache_info().currsize == 0
    zones = ["Asia/Tokyo", "America/Argentina/Buenos_Aires", "Etc/GMT+5"]
    # A legacy link, where the host's tz database has it (Debian 13 ships those apart).
    zones += [zone for zone in ("US/Eastern",) if zone in zoneinfo.available_timezones()]
    for zone in zones:
        assert parse_model(GenerationRequest, {"timezone": zone}).timezone == zone
    assert models._iana_zones.cache_info().currsize == 1
