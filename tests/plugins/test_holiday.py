"""holiday: today's holidays and the nearest upcoming one, movable feasts included."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from imagegen_plugins import holiday
from imagegen_plugins.holiday import HolidayPlugin


async def _holiday(
    settings: Settings, when: datetime, timezone: str | None = None, **options: object
) -> Contribution | None:
    plugins = PluginSet([HolidayPlugin(settings)], settings=settings)
    result = await plugins.run(
        generation_id="g", seed=1, now=when, timezone=timezone, options={"holiday": options}
    )
    return result[0] if result else None


async def test_thanksgiving_is_upcoming_two_days_before(settings: Settings) -> None:
    result = await _holiday(settings, datetime(2026, 11, 24, 12, tzinfo=UTC))
    assert result is not None
    assert result.data["today"] == []
    assert result.data["upcoming"] == {
        "name": "Thanksgiving Day",
        "date": "2026-11-26",
        "country": "US",
        "days": 2,
    }
    assert "Thanksgiving Day" in result.text


async def test_thanksgiving_today(settings: Settings) -> None:
    result = await _holiday(settings, datetime(2026, 11, 26, 12, tzinfo=UTC))
    assert result is not None
    assert [h["name"] for h in result.data["today"]] == ["Thanksgiving Day"]
    assert "Thanksgiving Day festivities" in result.text


async def test_the_date_is_taken_in_the_request_zone(settings: Settings) -> None:
    # 03:00 UTC on the 26th is still the evening of the 25th in Los Angeles.
    result = await _holiday(settings, datetime(2026, 11, 26, 3, tzinfo=UTC), "America/Los_Angeles")
    assert result is not None and result.data["today"] == []
    assert result.data["upcoming"]["days"] == 1


@pytest.mark.parametrize(
    ("when", "date"),
    [
        (datetime(2027, 3, 27, tzinfo=UTC), "2027-03-29"),
        (datetime(2026, 4, 4, tzinfo=UTC), "2026-04-06"),
    ],
)
async def test_easter_monday_moves_every_year(
    settings: Settings, when: datetime, date: str
) -> None:
    result = await _holiday(settings, when, countries=["DE"], language="de")
    assert result is not None
    assert result.data["upcoming"]["name"] == "Ostermontag"
    assert result.data["upcoming"]["date"] == date


async def test_names_default_to_english(settings: Settings) -> None:
    result = await _holiday(settings, datetime(2027, 3, 27, tzinfo=UTC), countries="DE")
    assert result is not None and result.data["upcoming"]["name"] == "Easter Monday"


async def test_horizon_and_nothing_near(settings: Settings) -> None:
    when = datetime(2026, 11, 1, tzinfo=UTC)
    result = await _holiday(settings, when)
    assert result is not None and result.data["upcoming"]["date"] == "2026-11-11"  # Veterans Day
    assert await _holiday(settings, when, horizon_days=3) is None


async def test_nearest_across_countries_and_the_year_end(settings: Settings) -> None:
    result = await _holiday(settings, datetime(2026, 12, 27, tzinfo=UTC), countries=["US", "GB"])
    assert result is not None
    assert result.data["upcoming"]["date"] == "2026-12-28"  # GB: Boxing Day (observed)
    newyear = await _holiday(settings, datetime(2026, 12, 30, tzinfo=UTC), countries=["US"])
    assert newyear is not None and newyear.data["upcoming"]["date"] == "2027-01-01"


async def test_settings_countries_and_subdivisions() -> None:
    settings = Settings(holiday_countries=["US-CA"])
    result = await _holiday(settings, datetime(2026, 3, 30, tzinfo=UTC))
    assert result is not None and result.data["upcoming"]["name"] == "Cesar Chavez Day"


async def test_unknown_country_option_is_invalid(settings: Settings) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await _holiday(settings, datetime(2026, 1, 5, tzinfo=UTC), countries=["XX"])
    assert caught.value.fields == ["plugin_options.holiday.countries"]


async def test_an_unknown_configured_country_is_left_out_and_named_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holiday, "_UNKNOWN_CONFIGURED", set())
    alone = Settings(holiday_countries=["XX"])
    with caplog.at_level(logging.WARNING, logger="imagegen_plugins.holiday"):
        assert await _holiday(alone, datetime(2026, 1, 5, tzinfo=UTC)) is None
        # The countries the library knows still count: the Fourth of July is on its day.
        beside = Settings(holiday_countries=["XX", "US"])
        for _ in range(3):
            result = await _holiday(beside, datetime(2026, 7, 4, 12, tzinfo=UTC))
            assert result is not None
            assert [t["country"] for t in result.data["today"]] == ["US"]
    named = [r for r in caplog.records if "XX" in r.getMessage()]
    assert len(named) == 1, "named once, not at every request"
    assert named[0].exc_info is None and "holiday_countries" in named[0].getMessage()


async def test_a_calendar_is_built_off_the_event_loop_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[threading.Thread] = []
    build = holiday._build_year

    def recorded(code: str, language: str | None, year: int) -> holiday._Calendar:
        built.append(threading.current_thread())
        return build(code, language, year)

    monkeypatch.setattr(holiday, "_build_year", recorded)
    monkeypatch.setattr(holiday, "_CALENDARS", {})
    first = await _holiday(settings, datetime(2031, 11, 24, 12, tzinfo=UTC))
    again = await _holiday(settings, datetime(2031, 11, 25, 12, tzinfo=UTC))
    assert first is not None and again is not None
    assert len(built) == 1, "the second request finds the year's calendar built"
    assert built[0] is not threading.current_thread()


async def test_warm_up_builds_the_configured_calendars_a_request_then_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(holiday_countries=["US", "DE-BY"], timezone="Pacific/Kiritimati")
    built: list[tuple[str, str | None, int]] = []
    build = holiday._build_year

    def recorded(code: str, language: str | None, year: int) -> holiday._Calendar:
        built.append((code, language, year))
        return build(code, language, year)

    monkeypatch.setattr(holiday, "_build_year", recorded)
    monkeypatch.setattr(holiday, "_CALENDARS", {})
    plugin = HolidayPlugin(settings)
    plugin.warm_up()
    # Today where the settings say, and as far as the default horizon reaches.
    now = datetime.now(ZoneInfo(settings.timezone))
    end = now + timedelta(days=holiday.DEFAULT_HORIZON_DAYS)
    years = range(now.year, end.year + 1)
    assert sorted(built) == sorted((c, None, y) for c in ("US", "DE-BY") for y in years)

    built.clear()
    await _holiday(settings, now)
    assert built == [], "a request today finds its calendars built"


def test_warm_up_names_an_unknown_configured_country() -> None:
    with pytest.raises(ValueError, match=r"holiday_countries: .*XX"):
        HolidayPlugin(Settings(holiday_countries=["XX"])).warm_up()
