"""Dreams the template writes (Ollama down): their light, their season, their schedule."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest

from imagegen.enhance import EnhanceStage
from imagegen.enhance._template import (
    DREAM_SUBJECTS,
    SEASONAL_SUBJECTS,
    SOUTHERN_COUNTRIES,
    dream_subject,
    in_southern_hemisphere,
    season_of,
)
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from imagegen_plugins.holiday import HolidayPlugin
from imagegen_plugins.time_of_day import names_its_light, period_of
from tests.fakes.ollama_server import FakeOllama

# Nothing listens there: every prompt falls back to the template, as with Ollama down.
NO_OLLAMA = "http://127.0.0.1:61401"

# Words of a season, read here rather than from the subjects' tags.
WINTRY = re.compile(r"\b(?:snow\w*|frozen|ice|icy|polar|penguins?|northern lights)\b", re.I)
SUMMERY = re.compile(r"\b(?:sunflowers|lavender|full bloom|summer|poppies|beach crowded)\b", re.I)

MakeDreamer = Callable[..., EnhanceStage]
_QUARTER = timedelta(minutes=15)


@pytest.fixture
async def dreamer() -> AsyncIterator[MakeDreamer]:
    """Builds stages whose Ollama does not answer: ``dreamer(**setting_overrides)``."""
    stages: list[EnhanceStage] = []

    def make(plugin_set: PluginSet | None = None, **overrides: object) -> EnhanceStage:
        fields: dict[str, object] = {
            "ollama_host": NO_OLLAMA,
            "ollama_retries": 0,
            "ollama_timeout": 0.5,
            "plugins": ["time_of_day"],
            "timezone": "UTC",
            "holiday_countries": ["US"],
            **overrides,
        }
        settings = Settings.model_validate(fields)
        plugin_set = plugin_set or PluginSet.from_settings(settings)
        stage = EnhanceStage(settings, plugin_set, backoff=0.01)
        stages.append(stage)
        return stage

    yield make
    for stage in stages:
        await stage.aclose()


def ticks(start: datetime, count: int, every: timedelta) -> list[tuple[str, datetime]]:
    """(event id, time) of a PingSource's ticks: each sent some milliseconds after its time."""
    return [
        (str(uuid.UUID(int=i + 1)), start + i * every + timedelta(milliseconds=37 * (i % 9)))
        for i in range(count)
    ]


async def dream(
    stage: EnhanceStage, event_id: str, when: datetime, **fields: object
) -> EnhancedPrompt:
    request = GenerationRequest.model_validate(fields)
    job = await stage.run(request, generation_id=f"gen-{event_id}", now=when)
    assert job.dreamed and job.fallback
    return job


def subject_of(job: EnhancedPrompt) -> str:
    """The shipped subject the template's prompt begins with."""
    found = [s for s in DREAM_SUBJECTS if job.prompt == s or job.prompt.startswith(f"{s}, ")]
    assert len(found) == 1, job.prompt
    return found[0]


async def subjects(stage: EnhanceStage, events: Iterable[tuple[str, datetime]]) -> list[str]:
    return [subject_of(await dream(stage, event_id, when)) for event_id, when in events]


def repeats_within(drawn: list[str], window: int) -> list[tuple[int, int, str]]:
    """(i, j, subject) for each subject drawn twice less than ``window`` places apart."""
    return [
        (i, j, drawn[i])
        for i in range(len(drawn))
        for j in range(i + 1, min(i + window, len(drawn)))
        if drawn[i] == drawn[j]
    ]


# 1. Light: a subject that names its own is not given the clock's


async def test_a_dream_naming_its_light_gets_no_other(dreamer: MakeDreamer) -> None:
    stage = dreamer()
    jobs = [
        await dream(stage, event_id, when)
        for event_id, when in ticks(datetime(2026, 7, 1, tzinfo=UTC), 192, timedelta(minutes=15))
    ]
    own = [job for job in jobs if names_its_light(subject_of(job))]
    assert own and len(own) < len(jobs)  # both kinds were drawn in these two days
    for job in jobs:
        [light] = [c for c in job.contributions if c.plugin == "time_of_day"]
        if job in own:  # the template leaves the clock's light out
            assert job.prompt == subject_of(job)
        else:
            assert job.prompt == f"{subject_of(job)}, {light.text}"


async def test_an_llm_dream_gets_the_light_the_template_leaves_out(dreamer: MakeDreamer) -> None:
    """The LLM never sees the template's subject: at a tick whose template subject names its
    light (a night market), the LLM still gets the hour's light to dream by."""
    day = datetime(2026, 7, 1, tzinfo=UTC)
    when = next(
        tick
        for tick in (day + i * timedelta(minutes=15) for i in range(96))
        if names_its_light(dream_subject(0, tick, ["US"]))
    )
    light = period_of(when.hour)[1]
    with FakeOllama() as fake:
        fake.reply_with({"prompt": "a paper boat race on a flooded street, children cheering"})
        llm = dreamer(ollama_host=fake.url)
        job = await llm.run(GenerationRequest(), generation_id="gen-llm", now=when)
        assert (job.dreamed, job.fallback) == (True, False)
        [sent] = fake.chat_requests
    assert [c.text for c in job.contributions] == [light]
    assert light in sent["messages"][-1]["content"]
    template = await dream(dreamer(), "llm", when)  # the same tick, Ollama down
    assert names_its_light(subject_of(template)) and light not in template.prompt


# 2. Season: a dream's season is its date's, in the plugins' zone and hemisphere


@pytest.mark.parametrize(
    ("countries", "month", "other_season", "own_season"),
    [
        (["US"], 7, WINTRY, "summer"),
        (["US"], 12, SUMMERY, "winter"),
        (["US", "AU"], 1, SUMMERY, "winter"),  # not every country southern: northern
        (["AU", "nz-auk"], 7, SUMMERY, "winter"),
        (["AU", "NZ"], 12, WINTRY, "summer"),
    ],
)
async def test_a_dream_fits_the_season(
    dreamer: MakeDreamer,
    countries: list[str],
    month: int,
    other_season: re.Pattern[str],
    own_season: str,
) -> None:
    stage = dreamer(holiday_countries=countries)
    drawn = await subjects(
        stage, ticks(datetime(2026, month, 24, tzinfo=UTC), 96, timedelta(minutes=15))
    )
    assert [s for s in drawn if other_season.search(s)] == []
    assert set(drawn) & set(SEASONAL_SUBJECTS[own_season])  # its own season's are drawn


@pytest.mark.parametrize("given_by", ["operator", "request"])
async def test_the_hemisphere_is_the_holiday_plugins_countries(
    dreamer: MakeDreamer, given_by: str
) -> None:
    """``countries`` given to the holiday plugin, by the operator's options or the request's,
    stand for IMAGEGEN_HOLIDAY_COUNTRIES, in its calendar and in the dreams' seasons."""
    options = {"holiday": {"countries": ["AU"]}}
    operator = {"plugin_options": options} if given_by == "operator" else {}
    stage = dreamer(plugins=["time_of_day", "holiday"], timezone="Australia/Sydney", **operator)
    fields = {"plugin_options": options} if given_by == "request" else {}
    christmas = datetime(2026, 12, 24, 13, tzinfo=UTC)  # midnight in Sydney
    drawn = [
        subject_of(await dream(stage, event_id, when, **fields))
        for event_id, when in ticks(christmas, 96, _QUARTER)
    ]
    assert [s for s in drawn if WINTRY.search(s)] == []
    assert set(drawn) & set(SEASONAL_SUBJECTS["summer"])


@pytest.mark.parametrize("countries", [["AU", "XX"], ["AUS", "NYSE"], ["au-nsw", "US-ZZ"]])
async def test_a_country_the_holiday_plugin_does_not_know_leaves_the_hemisphere_alone(
    dreamer: MakeDreamer, countries: list[str]
) -> None:
    """The plugin reads Australia alone (the others are unknown to its library), and so do the
    dreams: the unknown code made them northern, summer in a Sydney July. (A plugin set made
    from the settings refuses such codes at start-up; one made by a program of its own may
    hold them.)"""
    settings = Settings(plugins=["time_of_day", "holiday"], holiday_countries=countries)
    plugins = PluginSet.from_settings(settings, names=["time_of_day", "holiday"])
    stage = dreamer(plugins, holiday_countries=countries, timezone="Australia/Sydney")
    july = datetime(2026, 7, 9, 14, tzinfo=UTC)  # midnight in Sydney
    drawn = await subjects(stage, ticks(july, 96, _QUARTER))
    assert [s for s in drawn if SUMMERY.search(s)] == []
    assert set(drawn) & set(SEASONAL_SUBJECTS["winter"])


async def test_a_disabled_holiday_plugin_is_not_loaded_for_a_dream(
    dreamer: MakeDreamer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its countries are read as given (its library, tenths of a second and megabytes, is not
    loaded for a plugin the operator turned off); an enabled one reads them as it would."""
    asked: list[list[str]] = []

    async def known(self: HolidayPlugin, codes: list[str]) -> list[str]:
        asked.append(list(codes))
        return list(codes)

    monkeypatch.setattr(HolidayPlugin, "known_countries", known)
    july = datetime(2026, 7, 9, 14, tzinfo=UTC)
    await subjects(dreamer(holiday_countries=["AU"]), ticks(july, 2, _QUARTER))
    assert asked == []
    enabled = dreamer(plugins=["time_of_day", "holiday"], holiday_countries=["AU"])
    await subjects(enabled, ticks(july, 1, _QUARTER))
    assert asked == [["AU"]]


async def test_the_season_is_the_date_in_the_plugins_zone(dreamer: MakeDreamer) -> None:
    # 1 December 03:00 UTC is still 30 November, autumn, in New York.
    when = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
    stage = dreamer()
    for i, zone in enumerate(("America/New_York", "UTC")):
        job = await dream(stage, f"e{i}", when, timezone=zone)
        local = when.astimezone(ZoneInfo(zone))
        assert subject_of(job) == dream_subject(job.seed, local, ["US"])
    new_york = ZoneInfo("America/New_York")
    november_30 = {
        dream_subject(1, datetime(2026, 11, 30, tzinfo=new_york) + i * timedelta(minutes=15))
        for i in range(96)
    }
    assert not november_30 & set(SEASONAL_SUBJECTS["winter"])


# 3. Schedule: a PingSource's ticks cycle through the subjects


async def test_quarter_hourly_ticks_do_not_repeat_a_subject(dreamer: MakeDreamer) -> None:
    stage = dreamer()
    drawn = await subjects(
        stage, ticks(datetime(2026, 3, 9, tzinfo=UTC), 192, timedelta(minutes=15))
    )
    assert len(set(drawn[:96])) == 96 and len(set(drawn[96:])) == 96  # none twice in a day
    assert repeats_within(drawn, 28) == []  # nor within 7 hours across midnight


async def test_hourly_and_three_hourly_ticks_do_not_repeat_a_subject(
    dreamer: MakeDreamer,
) -> None:
    stage = dreamer(timezone="Europe/Berlin")
    start = datetime(2026, 5, 10, tzinfo=ZoneInfo("Europe/Berlin"))
    hourly = await subjects(stage, ticks(start, 72, timedelta(hours=1)))
    assert [len(set(hourly[d * 24 : d * 24 + 24])) for d in range(3)] == [24, 24, 24]
    assert repeats_within(hourly, 7) == []
    three_hourly = await subjects(stage, ticks(start, 80, timedelta(hours=3)))
    assert [len(set(three_hourly[d * 8 : d * 8 + 8])) for d in range(10)] == [8] * 10
    assert repeats_within(three_hourly, 3) == []


async def test_the_day_the_clock_goes_back_repeats_no_subject(dreamer: MakeDreamer) -> None:
    # 1 November 2026 in New York has 25 hours: 01:00-01:59 twice.
    stage = dreamer(timezone="America/New_York")
    start = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # local midnight
    drawn = await subjects(stage, ticks(start, 100, timedelta(minutes=15)))
    assert len(set(drawn)) == 100


def _transitions(zone: ZoneInfo, year: int) -> list[date]:
    """The days of ``year`` that are not 24 hours long in ``zone``."""
    days = [date(year, 1, 1) + timedelta(days=n) for n in range(366)]
    return [
        day
        for day in days
        if day.year == year
        and datetime.combine(day + timedelta(days=1), time(), tzinfo=zone).astimezone(UTC)
        - datetime.combine(day, time(), tzinfo=zone).astimezone(UTC)
        != timedelta(days=1)
    ]


@pytest.mark.parametrize("countries", [["NO"], ["AQ"]])
def test_a_clock_moved_by_two_hours_repeats_no_subject(countries: list[str]) -> None:
    """Antarctica/Troll moves between +00 and +02: days of 22 and 26 hours (88 and 104
    quarter-hours), in either hemisphere's seasons. None repeats within such a day, nor
    within 7 hours across its midnights."""
    troll = ZoneInfo("Antarctica/Troll")
    lengths = set()
    for year in range(2026, 2031):
        for moved in _transitions(troll, year):
            start = datetime.combine(moved - timedelta(days=1), time(), tzinfo=troll)
            end = datetime.combine(moved + timedelta(days=2), time(), tzinfo=troll)
            instants = [
                start.astimezone(UTC) + i * _QUARTER
                for i in range((end.astimezone(UTC) - start.astimezone(UTC)) // _QUARTER)
            ]
            drawn = [dream_subject(7, t.astimezone(troll), countries) for t in instants]
            by_day: dict[date, list[str]] = {}
            for instant, subject in zip(instants, drawn, strict=True):
                by_day.setdefault(instant.astimezone(troll).date(), []).append(subject)
            lengths.add(len(by_day[moved]))
            assert [len(set(d)) for d in by_day.values()] == [len(d) for d in by_day.values()]
            assert repeats_within(drawn, 28) == [], moved
    assert lengths == {88, 104}


async def test_redelivery_dreams_the_same_and_other_requests_differ(
    dreamer: MakeDreamer,
) -> None:
    stage = dreamer()
    tick = datetime(2026, 8, 14, 10, 0, 0, 412_000, tzinfo=UTC)
    first = await dream(stage, "ping-1", tick)
    again = await dream(stage, "ping-1", tick)  # the broker's redelivery: same id, same time
    assert (again.prompt, again.seed) == (first.prompt, first.seed)
    fresh = await make_another(dreamer, "ping-1", tick)  # another process
    assert fresh.prompt == first.prompt
    # Two other events in the tick's quarter-hour: neither copies it, nor each other.
    later = [await dream(stage, f"cli-{i}", tick + timedelta(minutes=7)) for i in range(2)]
    assert len({subject_of(first), *(subject_of(job) for job in later)}) == 3


async def make_another(dreamer: MakeDreamer, event_id: str, when: datetime) -> EnhancedPrompt:
    return await dream(dreamer(), event_id, when)


# The shipped subjects


SEASON_WORDS = re.compile(
    r"\b(?:winter\w*|summer\w*|spring|autumn\w*|fall|snow\w*|frost\w*|frozen|ice|icy"
    r"|blossoms?|bloom\w*|harvest\w*|christmas|easter)\b",
    re.IGNORECASE,
)


def test_subjects_outside_a_season_name_none() -> None:
    tagged = {s for subjects in SEASONAL_SUBJECTS.values() for s in subjects}
    assert len(set(DREAM_SUBJECTS)) == len(DREAM_SUBJECTS)
    assert [s for s in DREAM_SUBJECTS if s not in tagged and SEASON_WORDS.search(s)] == []
    # Every season offers a subject for each quarter-hour of the longest day.
    assert (
        min(len(DREAM_SUBJECTS) - len(tagged) + len(s) for s in SEASONAL_SUBJECTS.values()) >= 104
    )


@pytest.mark.parametrize(
    ("countries", "south"),
    [
        (["AU"], True),
        (["au-nsw", "NZ", "ARG"], True),
        (["AU", "US"], False),
        (["US"], False),
        ([], False),
        # Mostly south of the equator, by land area.
        (["ID", "EC", "CD", "CG", "GA", "TZ", "RW", "BI", "SC", "KM", "YT", "RE"], True),
        (["PG", "TL", "SB", "VU", "NC", "WS", "AS", "TO", "NR", "TV", "CK", "NU", "PF"], True),
        (["WF", "FK", "GS", "SH", "AQ", "IO", "NF", "PN", "TK", "CX", "CC", "TF", "HM"], True),
        (["IDN", "ECU", "VTU", "SZW", "br-sp"], True),  # alpha-3, as the holidays library has it
        # Mostly north of it: the Maldives, Kiribati, Kenya.
        (["MV"], False),
        (["KI"], False),
        (["AU", "KE"], False),
        (["AU", "MDV"], False),
    ],
)
def test_the_hemisphere_is_the_southern_where_every_country_is(
    countries: list[str], south: bool
) -> None:
    july = datetime(2026, 7, 10, tzinfo=UTC)
    assert in_southern_hemisphere(countries) is south
    assert season_of(july.date(), southern=south) == ("winter" if south else "summer")


async def test_the_southern_countries_are_codes_the_holiday_plugin_reads() -> None:
    """Every one (but the ISO spellings SWZ and VUT: the library has SZW and VTU), and every
    alias the library lists for a southern country (``AUS`` is Australia): a configured
    code the plugin reads for a southern country keeps the dreams southern."""
    plugin = HolidayPlugin(Settings())
    read = set(await plugin.known_countries(SOUTHERN_COUNTRIES))
    assert SOUTHERN_COUNTRIES - read == {"SWZ", "VUT"}
    listed = holidays.list_supported_countries()
    aliases = {code for code in listed if getattr(holidays, code).country in SOUTHERN_COUNTRIES}
    assert aliases - SOUTHERN_COUNTRIES == set()
