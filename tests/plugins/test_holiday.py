"""holiday: today's holidays and the nearest upcoming one, movable feasts included."""

from __future__ import annotations

import logging
import sys
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from imagegen.errors import ConfigurationError, InvalidRequest
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


@pytest.mark.parametrize("language", [None, "en", "en-US", "EN", "en_us", " En-gb ", "fr"])
async def test_a_language_is_matched_loosely_and_falls_back_to_english(
    settings: Settings, language: str | None
) -> None:
    """Any case, "-" or "_"; where the country has no names in it (Japan has none in French),
    English, not the country's own language in an English prompt."""
    options = {"countries": "JP"} if language is None else {"countries": "JP", "language": language}
    result = await _holiday(settings, datetime(2026, 1, 1, 12, tzinfo=UTC), **options)
    assert result is not None
    assert [t["name"] for t in result.data["today"]] == ["New Year's Day"]
    assert result.data["upcoming"]["name"] == "Coming of Age Day"


async def test_a_language_the_country_has_is_used(settings: Settings) -> None:
    japanese = await _holiday(settings, datetime(2026, 1, 1, 12, tzinfo=UTC), countries="JP")
    for spelt in ("ja", "JA", "ja-JP"):
        result = await _holiday(
            settings, datetime(2026, 1, 1, 12, tzinfo=UTC), countries="JP", language=spelt
        )
        assert result is not None and japanese is not None
        assert result.data["today"][0]["name"] == "元日" != japanese.data["today"][0]["name"]
    german = await _holiday(
        settings, datetime(2027, 3, 27, tzinfo=UTC), countries="DE", language="De"
    )
    assert german is not None and german.data["upcoming"]["name"] == "Ostermontag"


@pytest.mark.parametrize("language", ["english", "klingon", "xx", "-", "  "])
async def test_a_language_no_calendar_has_is_refused(settings: Settings, language: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await _holiday(settings, datetime(2026, 1, 1, 12, tzinfo=UTC), language=language)
    assert caught.value.fields == ["plugin_options.holiday.language"]


def _recording_builds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, int]]:
    """An empty calendar cache, and the (country, language, year) of each calendar built."""
    built: list[tuple[str, str | None, int]] = []
    build = holiday._build_year

    def recorded(code: str, language: str | None, year: int) -> holiday._Calendar:
        built.append((code, language, year))
        return build(code, language, year)

    monkeypatch.setattr(holiday, "_build_year", recorded)
    monkeypatch.setattr(holiday, "_CALENDARS", {})
    return built


async def test_calendars_are_kept_by_the_language_they_are_read_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept by the request's spelling, every spelling of English built the calendar anew and
    pushed the others out of the cache."""
    built = _recording_builds(monkeypatch)
    when = datetime(2033, 6, 1, 12, tzinfo=UTC)
    await _holiday(settings, when)
    for spelt in ("en", "EN", "en-US", "en_US", "fr", "ja"):  # the US has none in French
        await _holiday(settings, when, language=spelt)
    assert built == [("US", "en_US", 2033)]


@pytest.mark.parametrize(
    ("when", "today", "upcoming"),
    [
        # 2027: the Fourth of July is a Sunday, observed on Monday the 5th.
        (datetime(2027, 7, 4, 12, tzinfo=UTC), ["Independence Day"], None),
        (datetime(2027, 7, 5, 12, tzinfo=UTC), [], None),
        # 2026: a Saturday, observed on Friday the 3rd, before the feast.
        (datetime(2026, 7, 2, 12, tzinfo=UTC), [], ("Independence Day", "2026-07-04")),
    ],
)
async def test_a_feast_is_named_on_its_day_not_again_where_observed(
    settings: Settings, when: datetime, today: list[str], upcoming: tuple[str, str] | None
) -> None:
    """Both were named: "Independence Day festivities, subtle hints of the coming
    Independence Day (observed)"."""
    result = await _holiday(settings, when, countries="US", horizon_days=7)
    data = {"today": [], "upcoming": None} if result is None else result.data
    assert [t["name"] for t in data["today"]] == today
    coming = data["upcoming"]
    assert (coming and (coming["name"], coming["date"])) == upcoming
    assert result is None or "observed" not in result.text


async def test_horizon_and_nothing_near(settings: Settings) -> None:
    when = datetime(2026, 11, 1, tzinfo=UTC)
    result = await _holiday(settings, when)
    assert result is not None and result.data["upcoming"]["date"] == "2026-11-11"  # Veterans Day
    assert await _holiday(settings, when, horizon_days=3) is None


async def test_nearest_across_countries_and_the_year_end(settings: Settings) -> None:
    # On Christmas Day the nearest is GB's Boxing Day; the US has nothing until New Year.
    result = await _holiday(settings, datetime(2026, 12, 25, tzinfo=UTC), countries=["US", "GB"])
    assert result is not None
    assert result.data["upcoming"] == {
        "name": "Boxing Day",
        "date": "2026-12-26",
        "country": "GB",
        "days": 1,
    }
    # Boxing Day 2026 is a Saturday, observed on Monday the 28th: a day off, but no second
    # feast, so after it the nearest is the New Year, across the year end.
    after = await _holiday(settings, datetime(2026, 12, 27, tzinfo=UTC), countries=["US", "GB"])
    assert after is not None and after.data["upcoming"]["date"] == "2027-01-01"
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
    built = _recording_builds(monkeypatch)
    plugin = HolidayPlugin(settings)
    plugin.warm_up()
    # Today where the settings say, and as far as the default horizon reaches.
    now = datetime.now(ZoneInfo(settings.timezone))
    end = now + timedelta(days=holiday.DEFAULT_HORIZON_DAYS)
    years = range(now.year, end.year + 1)
    # Names in English, as a request giving no language reads them.
    assert sorted(built) == sorted((c, "en_US", y) for c in ("US", "DE-BY") for y in years)

    built.clear()
    await _holiday(settings, now)
    assert built == [], "a request today finds its calendars built"


@pytest.mark.parametrize("countries", [["XX"], ["NYSE"], ["AU", "XX"], ["US", "DE-ZZ", "JAN"]])
def test_an_unknown_configured_country_is_refused_where_the_plugin_set_is_made(
    countries: list[str],
) -> None:
    """As the same code in the plugin's ``countries`` option is: at start-up, naming the
    variable, not a log line at warm-up and a plugin that adds nothing to any request."""
    settings = Settings(plugins=["holiday"], holiday_countries=countries)
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(settings)
    assert refused.value.fields == ["IMAGEGEN_HOLIDAY_COUNTRIES"]
    unknown = [code for code in countries if code not in ("AU", "US")]
    assert all(repr(code.partition("-")[2] or code) in refused.value.message for code in unknown)
    assert refused.value.message.startswith("invalid settings: IMAGEGEN_HOLIDAY_COUNTRIES (")


def test_the_unknown_country_named_in_a_refusal_is_the_one_the_docs_show(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The docs said no refused value is ever echoed, and this refusal names the country (no
    secret, and the entry to change): they now say which values are never echoed, and quote
    this refusal as it is."""
    from pathlib import Path

    monkeypatch.setenv("IMAGEGEN_HOLIDAY_COUNTRIES", "XX")
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(Settings(plugins=["holiday"]))
    said = refused.value.message
    assert said == "invalid settings: IMAGEGEN_HOLIDAY_COUNTRIES (unknown country 'XX')"
    docs = Path(__file__).parents[2] / "docs" / "configuration.md"
    text = " ".join(docs.read_text().split())  # its lines joined, as Markdown reads them
    assert f"(`{said}`, cut after 24)" in text
    assert "and never echoed" not in text


def test_the_configured_countries_the_library_lists_are_taken() -> None:
    for countries in (["US"], ["de-by", "GBR", "uk", "AU-NSW"], []):
        settings = Settings(plugins=["holiday"], holiday_countries=countries)
        assert PluginSet.from_settings(settings).names == ("holiday",)
    # Only an enabled plugin's settings are its to refuse.
    unused = Settings(plugins=["time_of_day"], holiday_countries=["XX"])
    assert PluginSet.from_settings(unused).names == ("time_of_day",)


def test_the_default_countries_are_ones_the_library_lists_and_are_not_looked_up_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default is not checked where the plugin set is made (listing the library's
    countries takes tenths of a second before the function is ready): it must be listed."""
    default = Settings(plugins=["holiday"])
    assert all(holiday._canonical(code) == code for code in default.holiday_countries)
    looked_up: list[str] = []
    monkeypatch.setattr(holiday, "_canonical", lambda code: looked_up.append(code) or code)
    assert PluginSet.from_settings(default).names == ("holiday",)
    assert looked_up == []
    PluginSet.from_settings(Settings(plugins=["holiday"], holiday_countries=["DE"]))
    assert looked_up == ["DE"]


async def test_known_countries_are_read_as_the_plugin_reads_them(settings: Settings) -> None:
    plugin = HolidayPlugin(settings)
    codes = ["au", "XX", " AU-nsw", "AUS", "NYSE", "AU", "de-zz"]
    assert await plugin.known_countries(codes) == ["AU", "AU-NSW", "AUS"]
    assert await plugin.known_countries([]) == []


def test_unknown_countries_in_the_operators_plugin_options_are_refused_at_start() -> None:
    """The function turned ready, then answered every request 503 naming the option."""
    options = {"holiday": {"countries": "AU,XX"}}
    settings = Settings(plugins=["holiday"], plugin_options=options)
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(settings)
    assert refused.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]
    assert refused.value.message == (
        "invalid settings: IMAGEGEN_PLUGIN_OPTIONS"
        " (plugin_options.holiday.countries: unknown country 'XX')"
    )
    fine = Settings(plugins=["holiday"], plugin_options={"holiday": {"countries": ["au", "NZ"]}})
    assert PluginSet.from_settings(fine).names == ("holiday",)


@pytest.mark.parametrize(
    ("countries", "when", "upcoming"),
    [
        # Argentina's Independence Day (9 July) is no day of the United States' (4 July).
        ("US,AR", datetime(2025, 7, 4, 12, tzinfo=UTC), ("Independence Day", "AR", 5)),
        # Labor Day in Western Australia (3 March), then in Victoria (10 March).
        ("AU-WA,AU-VIC", datetime(2025, 3, 3, 12, tzinfo=UTC), ("Labor Day", "AU-VIC", 7)),
    ],
)
async def test_a_feast_of_todays_name_elsewhere_or_later_is_the_coming_one(
    settings: Settings, countries: str, when: datetime, upcoming: tuple[str, str, int]
) -> None:
    result = await _holiday(settings, when, countries=countries)
    assert result is not None
    name, country, days = upcoming
    assert result.data["upcoming"]["name"] == name
    assert result.data["upcoming"]["country"] == country
    assert result.data["upcoming"]["days"] == days
    assert f"subtle hints of the coming {name}" in result.text


@pytest.mark.parametrize(
    ("country", "when", "today", "upcoming"),
    [
        # Chinese New Year is a holiday of several days: its second is not its own coming one.
        ("CN", datetime(2026, 2, 17, 12, tzinfo=UTC), "Chinese New Year (Spring Festival)", None),
        # Russia's New Year holidays (1 to 6 January) hid Christmas on the 7th.
        ("RU", datetime(2026, 1, 2, 12, tzinfo=UTC), "New Year Holidays", "Christmas Day"),
    ],
)
async def test_a_feast_of_several_days_is_not_its_own_coming_one(
    settings: Settings, country: str, when: datetime, today: str, upcoming: str | None
) -> None:
    result = await _holiday(settings, when, countries=country)
    assert result is not None
    assert today in [t["name"] for t in result.data["today"]]
    coming = result.data["upcoming"]
    assert coming is None or coming["name"] != today
    assert f"coming {today}" not in result.text
    if upcoming is not None:
        assert coming is not None and coming["name"] == upcoming


def test_warm_up_names_an_unknown_configured_country() -> None:
    with pytest.raises(ValueError, match=r"holiday_countries: .*XX"):
        HolidayPlugin(Settings(holiday_countries=["XX"])).warm_up()


async def test_a_request_names_at_most_sixteen_distinct_countries(settings: Settings) -> None:
    """Built calendars are read on the event loop: what one request makes it read is bounded.
    A code repeated (in any case) counts once."""
    when = datetime(2026, 7, 4, 12, tzinfo=UTC)
    repeated = await _holiday(settings, when, countries=",".join(["US", "us", "Us"] * 100))
    assert repeated is not None and [t["country"] for t in repeated.data["today"]] == ["US"]
    seventeen = sorted(holiday._supported())[:17]
    assert await _holiday(settings, when, countries=seventeen[:16]) is not None
    for countries in (seventeen, ",".join(["US"] * 200_000), ["US"] * 200_000):
        with pytest.raises(InvalidRequest) as caught:
            await _holiday(settings, when, countries=countries)
        assert caught.value.fields == ["plugin_options.holiday.countries"]


@pytest.mark.parametrize(
    "code",
    # The library's constants and financial markets (found by getattr on its module, as its
    # countries are), and subdivisions it does not list.
    ["JAN", "HOLIDAY_NAME_DELIMITER", "NYSE", "ECB", "US-", "DE-ZZ", "-US"],
)
async def test_only_the_countries_the_library_lists_are_countries(
    settings: Settings, code: str
) -> None:
    """Not skipped with a traceback (a 200 that drops the valid countries beside), nor taken
    for a country: the caller's mistake, a 400 naming the option."""
    with pytest.raises(InvalidRequest) as caught:
        await _holiday(settings, datetime(2026, 7, 4, 12, tzinfo=UTC), countries=["US", code])
    assert caught.value.fields == ["plugin_options.holiday.countries"]


async def test_subdivisions_are_matched_whatever_their_case(settings: Settings) -> None:
    when = datetime(2026, 3, 30, tzinfo=UTC)
    for code in ("us-ca", "US-CA"):
        result = await _holiday(settings, when, countries=[code])
        assert result is not None and result.data["upcoming"]["name"] == "Cesar Chavez Day"
        assert result.data["upcoming"]["country"] == "US-CA"
    augsburg = await _holiday(settings, datetime(2026, 8, 1, tzinfo=UTC), countries="de-augsburg")
    assert augsburg is not None and augsburg.data["upcoming"]["country"] == "DE-Augsburg"


async def test_a_configured_constant_of_the_library_is_left_out_and_named_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holiday, "_UNKNOWN_CONFIGURED", set())
    beside = Settings(holiday_countries=["JAN", "NYSE", "US"])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            result = await _holiday(beside, datetime(2026, 7, 4, 12, tzinfo=UTC))
            assert result is not None
            assert [t["country"] for t in result.data["today"]] == ["US"]
    for code in ("JAN", "NYSE"):
        named = [r for r in caplog.records if repr(code) in r.getMessage()]
        assert len(named) == 1, f"{code} named once, not at every request"
        assert named[0].exc_info is None and "holiday_countries" in named[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


def test_warm_up_builds_the_known_countries_and_names_every_unknown_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    build = holiday._build_year

    def recorded(code: str, language: str | None, year: int) -> holiday._Calendar:
        built.append(code)
        return build(code, language, year)

    monkeypatch.setattr(holiday, "_build_year", recorded)
    monkeypatch.setattr(holiday, "_CALENDARS", {})
    plugin = HolidayPlugin(Settings(holiday_countries=["JAN", "US", "XX"]))
    with pytest.raises(ValueError, match=r"holiday_countries: .*'JAN'.*'XX'"):
        plugin.warm_up()
    assert set(built) == {"US"}


def test_the_calendar_cache_is_shared_safely_by_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calendars are built on worker threads, several at once: one evicting while another
    inserts raised 'dictionary changed size during iteration', and the cap was overrun."""
    monkeypatch.setattr(holiday, "_build_year", lambda code, language, year: ())
    monkeypatch.setattr(holiday, "_CALENDARS", {})
    monkeypatch.setattr(holiday, "_MAX_CALENDARS", 8)  # evicting at nearly every insert
    errors: list[BaseException] = []
    sizes: list[int] = []

    def build(worker: int) -> None:
        try:
            for i in range(20_000):
                holiday._year(f"C{worker}", str(i), 2026)
                sizes.append(len(holiday._CALENDARS))
        except Exception as exc:
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        threads = [threading.Thread(target=build, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert max(sizes) <= 8
