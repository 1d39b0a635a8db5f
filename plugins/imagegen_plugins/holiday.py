"""Today's holidays and the nearest upcoming one, from the ``holidays`` library.

Movable feasts (Easter, Thanksgiving, lunar new year...) come from the library's calendars, so
they are right every year. Countries are ISO codes, optionally with a subdivision: ``US``,
``DE-BY`` (any case; as ``holidays.list_supported_countries()`` lists them). Holiday names are
in English where the library has an English translation (option ``language`` picks another:
``de``, ``en-GB``, any case; a country without it falls back to English), so the prompt reads
the same on every host. A feast is named on its own date only, not again on the weekday it
is observed.

Options: ``countries`` (overrides ``settings.holiday_countries``), ``horizon_days`` (how far
ahead an upcoming holiday counts, default 14), ``language``. A request names at most
:data:`MAX_COUNTRIES` countries, each one the library lists (its financial markets, ``NYSE``,
are no countries); ``settings.holiday_countries`` is held to the same rule where the plugin
set is made from the settings (:meth:`HolidayPlugin.setting_errors`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins._options import invalid_option, option_float, option_list, option_str

__all__ = ["DEFAULT_HORIZON_DAYS", "MAX_COUNTRIES", "HolidayPlugin", "holidays_between"]

DEFAULT_HORIZON_DAYS = 14
MAX_COUNTRIES = 16
"""Distinct countries a request may name: built calendars are read on the event loop, so what
one request makes it read is bounded (a country is a calendar per year of the horizon)."""
_MAX_GIVEN = 1024  # characters of the option's text, or items of its list: read on the loop

log = logging.getLogger("imagegen_plugins.holiday")


def _unknown(codes: Iterable[str]) -> str:
    """What of ``codes`` the library does not list, said as a request's refusal says it; ''
    where it lists them all."""
    unknown: list[str] = []
    for code in codes:
        try:
            _canonical(code)
        except NotImplementedError as exc:
            unknown.append(str(exc))
    return "; ".join(unknown)


_DEFAULT_COUNTRIES = Settings.model_fields["holiday_countries"].get_default(
    call_default_factory=True
)

# Configured countries the library does not know, in a plugin set not made from the settings
# (which refuses them: setting_errors): named once in the log, then left out. The warm-up names
# them at start; a request still uses the others.
_UNKNOWN_CONFIGURED: set[str] = set()


# The library's countries, each with its subdivisions by their upper-case spelling: the library
# finds a country by getattr on its module, so any other name is either refused or one of its
# constants (``JAN``) or financial markets (``NYSE``). Listing them imports every country's
# module (tenths of a second): made once, off the event loop.
_SUPPORTED: dict[str, dict[str, str]] | None = None
# Each country's (languages its names come in, the language it uses when given none), made
# with _SUPPORTED; and every language some country's names come in, in lower case, with the
# first part of each (``pt`` of ``pt_BR``).
_LANGUAGES: dict[str, tuple[tuple[str, ...], str | None]] = {}
_ANY_LANGUAGE: set[str] = set()


def _supported() -> dict[str, dict[str, str]]:
    """The library's countries (aliases too: ``UK``, ``GBR``), made on the first call."""
    global _SUPPORTED
    if _SUPPORTED is None:
        import holidays  # here, not with the plugin: enhance makes its plugins before ready

        listed = holidays.list_supported_countries()
        for country in listed:
            entity = getattr(holidays, country)  # the country's class: read, not built
            supported = tuple(entity.supported_languages)
            _LANGUAGES[country.upper()] = (supported, entity.default_language)
            _ANY_LANGUAGE.update(lang.lower() for lang in supported)
            _ANY_LANGUAGE.update(_base(lang) for lang in supported)
        _SUPPORTED = {
            country.upper(): {subdiv.upper(): subdiv for subdiv in subdivs}
            for country, subdivs in listed.items()
        }
    return _SUPPORTED


def _base(language: str) -> str:
    return language.split("_")[0].lower()


def _english(supported: tuple[str, ...]) -> str | None:
    if "en_US" in supported:
        return "en_US"
    return next((lang for lang in supported if _base(lang) == "en"), None)


def _spelling(wanted: str) -> str:
    """``wanted`` in lower case with ``_`` between its parts (``en-US`` is ``en_us``).

    Raises:
        ValueError: no country's names come in it, nor in its first part.
    """
    spelt = wanted.strip().replace("-", "_").lower()
    if spelt not in _ANY_LANGUAGE and _base(spelt) not in _ANY_LANGUAGE:
        raise ValueError(f"no calendar has names in {_shown(wanted)}")
    return spelt


def _language(code: str, wanted: str | None) -> str | None:
    """The language ``code``'s (canonical) names are read in, for a request's ``wanted`` one.

    ``wanted`` is matched in any case, ``-`` or ``_`` between its parts (``en-US``, ``DE``),
    first as given, then by its first part (``en`` is ``en_GB`` in GB). A country without
    it reads in English where it has English, else in its own language.

    Raises:
        ValueError: no country's names come in ``wanted`` (:func:`_spelling`).
    """
    supported, default = _LANGUAGES[code.partition("-")[0]]
    if wanted is not None:
        spelt = _spelling(wanted)
        by_lower = {lang.lower(): lang for lang in supported}
        found = by_lower.get(spelt) or next(
            (lang for lang in supported if _base(lang) == _base(spelt)), None
        )
        if found is not None:
            return found
    return _english(supported) or default


def _shown(text: str, limit: int = 24) -> str:
    """``text`` quoted for a message, cut short: a request's code may be of any length."""
    return repr(text if len(text) <= limit else f"{text[:limit]}...")


def _canonical(code: str) -> str:
    """``code`` (``CC`` or ``CC-SUBDIV``, any case) as the library spells it.

    Raises:
        NotImplementedError: the library lists no such country, or no such subdivision of it.
    """
    country, dash, subdiv = code.strip().upper().partition("-")
    subdivisions = _supported().get(country)
    if subdivisions is None:
        raise NotImplementedError(f"unknown country {_shown(country)}")
    if not dash:
        return country
    spelt = subdivisions.get(subdiv)
    if spelt is None:
        raise NotImplementedError(f"country {country} has no subdivision {_shown(subdiv)}")
    return f"{country}-{spelt}"


_Calendar = tuple[tuple[date, tuple[str, ...]], ...]
_CALENDARS: dict[tuple[str, str | None, int], _Calendar] = {}
_MAX_CALENDARS = 256  # requests choose countries and languages: the oldest go first
# Calendars are built on worker threads, several at once: evicting (iterating the dict) while
# another inserts would raise, and two inserting past the cap at once would overrun it.
_CALENDARS_LOCK = threading.Lock()


def _year(code: str, language: str | None, year: int) -> _Calendar:
    """The holidays of ``code`` (canonical: :func:`_canonical`) in ``year``, by date; built once."""
    key = (code, language, year)
    with _CALENDARS_LOCK:
        calendar = _CALENDARS.get(key)
    if calendar is None:
        # Built outside the lock: look-ups of built calendars never wait on a build.
        calendar = _build_year(code, language, year)
        with _CALENDARS_LOCK:
            if key not in _CALENDARS:
                if len(_CALENDARS) >= _MAX_CALENDARS:
                    _CALENDARS.pop(next(iter(_CALENDARS)))
                _CALENDARS[key] = calendar
    return calendar


def _build_year(code: str, language: str | None, year: int) -> _Calendar:
    """The calendar of ``code`` in ``year``, names in ``language`` (:func:`_language`'s).

    Without observed days: a feast falling on a weekend is kept on its date, not named a
    second time on the weekday it is observed ("Independence Day (observed)").
    """
    import holidays

    country, _, subdiv = code.partition("-")
    calendar = holidays.country_holidays(
        country, subdiv=subdiv or None, years=year, language=language, observed=False
    )
    return tuple((day, tuple(calendar.get_list(day))) for day in sorted(calendar))


def holidays_between(
    code: str, start: date, end: date, language: str | None = None
) -> list[tuple[date, str]]:
    """Every (date, name) of country ``code`` from ``start`` to ``end``, both included.

    Names are in ``language`` where the country has it, else in English (:func:`_language`).

    Raises:
        NotImplementedError: the country or subdivision is unknown to the library.
        ValueError: no country's names come in ``language``.
    """
    code = _canonical(code)
    resolved = _language(code, language)
    found: list[tuple[date, str]] = []
    for year in range(start.year, end.year + 1):
        for day, names in _year(code, resolved, year):
            if start <= day <= end:
                found.extend((day, name) for name in names)
    return found


class HolidayPlugin:
    """Adds today's holidays and hints of the nearest coming one."""

    name = "holiday"
    description = "Today's holidays and the nearest upcoming one (holidays library)."
    option_names = ("countries", "horizon_days", "language")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def warm_up(self) -> None:
        """Build the configured countries' calendars for the default horizon from today.

        The library imports every country's module with the first calendar it builds, which
        takes tenths of a second: done here, a function's first request does not wait for it.

        Raises:
            ValueError: naming the configured countries the library does not know (the others
                are built all the same).
        """
        today = datetime.now(ZoneInfo(self.settings.timezone)).date()
        unknown = []
        for code in self.settings.holiday_countries:
            try:
                holidays_between(code, today, today + timedelta(days=DEFAULT_HORIZON_DAYS))
            except NotImplementedError as exc:
                unknown.append(str(exc))
        if unknown:
            raise ValueError(f"holiday_countries: {'; '.join(unknown)}")

    def setting_errors(self, time_limit: float) -> list[dict[str, str]]:
        """What is wrong with the settings this plugin reads, one entry per setting (its name as
        ``field``); asked once, where the plugin set is made from the settings.

        Every one of ``holiday_countries``, and of the ``countries`` option
        ``plugin_options`` gives, must be a country (or subdivision) the library lists, as a
        request's ``countries`` must: one it does not know (``XX``, a market such as ``NYSE``)
        would add nothing to any request, or fail every one; it is named, cut short (a country's
        code holds no secret, docs/configuration.md). Listing the library's countries takes
        tenths of a second, here before the function is ready (the warm-up would take them
        after): so the default, a country it lists (a test holds it to that), is not looked up.
        """
        errors: list[dict[str, str]] = []
        configured = list(self.settings.holiday_countries)
        if configured != _DEFAULT_COUNTRIES and (unknown := _unknown(configured)):
            errors.append({"field": "holiday_countries", "message": unknown})
        # The countries IMAGEGEN_PLUGIN_OPTIONS gives every request, held to the same rule: an
        # option's other faults are the plugin set's to say (option_errors).
        options = self.settings.plugin_options.get(self.name, {})
        try:
            requested = self._requested(options)
        except InvalidRequest:
            requested = None
        if requested and (unknown := _unknown(requested)):
            said = f"plugin_options.{self.name}.countries: {unknown}"
            errors.append({"field": "plugin_options", "message": said})
        return errors

    async def known_countries(self, codes: Iterable[str]) -> list[str]:
        """``codes`` as this plugin reads them: canonical (``AU-NSW``, ``GBR``), each once, those
        the library does not list left out (a request naming one is refused as it runs)."""
        if _SUPPORTED is None:
            await asyncio.to_thread(_supported)  # imports every country's module: once
        known: list[str] = []
        for code in dict.fromkeys(code.strip().upper() for code in codes):
            try:
                known.append(_canonical(code))
            except NotImplementedError:
                continue
        return list(dict.fromkeys(known))

    async def contribute(self, context: PluginContext) -> Contribution | None:
        """Holidays on ``context.now``'s date and within the horizon after it."""
        options = context.options
        requested = self._requested(options)
        horizon = int(
            option_float(options, self.name, "horizon_days", DEFAULT_HORIZON_DAYS, low=0, high=366)
        )
        language = option_str(options, self.name, "language")
        if _SUPPORTED is None:
            await asyncio.to_thread(_supported)  # imports every country's module: once
        codes = self._codes(requested)
        if language is not None:
            try:
                _spelling(language)
            except ValueError as exc:
                raise invalid_option(self.name, "language", str(exc)) from None
        languages = [_language(code, language) for code in codes]
        today = context.now.date()
        years = range(today.year, (today + timedelta(days=horizon)).year + 1)
        args = (codes, today, horizon, language)
        built = zip(codes, languages, strict=True)
        if all((code, lang, year) in _CALENDARS for code, lang in built for year in years):
            return self._contribution(*args)  # look-ups in built calendars: on the loop
        # The library computes a year's calendar: tenths of a second, off the event loop (once
        # per country, language and year).
        return await asyncio.to_thread(self._contribution, *args)

    def _requested(self, options: Mapping[str, Any]) -> list[str] | None:
        """The request's countries, each once (in upper case); None when it names none.

        Counted before anything reads them, as they are read on the event loop: a request
        may repeat one code a hundred thousand times, in text or in a list.

        Raises:
            InvalidRequest: naming ``plugin_options.holiday.countries``: more than
                :data:`MAX_COUNTRIES` distinct countries, or given in more than
                :data:`_MAX_GIVEN` characters (text) or items (a list).
        """
        given = options.get("countries")
        if isinstance(given, str | list) and len(given) > _MAX_GIVEN:
            unit = "characters" if isinstance(given, str) else "items"
            raise invalid_option(
                self.name, "countries", f"too long: {len(given)} {unit}, at most {_MAX_GIVEN}"
            )
        requested = option_list(options, self.name, "countries")
        if requested is None:
            return None
        distinct = list(dict.fromkeys(code.upper() for code in requested))
        if len(distinct) > MAX_COUNTRIES:
            raise invalid_option(
                self.name,
                "countries",
                f"at most {MAX_COUNTRIES} distinct countries, got {len(distinct)}",
            )
        return distinct

    def _codes(self, requested: list[str] | None) -> list[str]:
        """The countries to read, canonical and each once: the request's, else the settings'.

        A request's unknown code is its fault (a 400 naming the option); a configured one,
        which the plugin set made from the settings refuses (:meth:`setting_errors`), is named
        once in the log and left out in a set made otherwise, the others still read.

        Raises:
            InvalidRequest: naming ``plugin_options.holiday.countries``.
        """
        codes: list[str] = []
        unknown: list[str] = []
        for code in self.settings.holiday_countries if requested is None else requested:
            try:
                codes.append(_canonical(code))
            except NotImplementedError as exc:
                if requested is not None:
                    unknown.append(str(exc))
                elif code not in _UNKNOWN_CONFIGURED:
                    _UNKNOWN_CONFIGURED.add(code)
                    log.warning("holiday_countries: %s; %s left out", exc, code)
        if unknown:
            raise invalid_option(self.name, "countries", "; ".join(unknown))
        return list(dict.fromkeys(codes))

    def _contribution(
        self, codes: list[str], today: date, horizon: int, language: str | None
    ) -> Contribution | None:
        end = today + timedelta(days=horizon)
        found = [
            (day, name, code)
            for code in codes
            for day, name in holidays_between(code, today, end, language)
        ]
        todays: list[dict[str, Any]] = []
        for day, name, code in found:
            if day == today and all(t["name"] != name for t in todays):
                todays.append({"name": name, "date": day.isoformat(), "country": code})
        # A feast of several days (the Spring Festival, Russia's New Year holidays) is not its
        # own coming one: the nearest is another, whose hints the prompt would otherwise hide.
        # Its days are those of its country, one after another from today, of its name: a feast
        # of the same name elsewhere or later (Argentina's Independence Day five days after the
        # United States') is another.
        dated = {(day, name, code) for day, name, code in found}
        going_on: set[tuple[date, str, str]] = set()
        for day, name, code in found:
            if day == today:
                after = today + timedelta(days=1)
                while (after, name, code) in dated:
                    going_on.add((after, name, code))
                    after += timedelta(days=1)
        upcoming: dict[str, Any] | None = None
        for day, name, code in found:
            if day == today or (day, name, code) in going_on:
                continue
            if upcoming is None or day.isoformat() < upcoming["date"]:
                entry = {"name": name, "date": day.isoformat(), "country": code}
                upcoming = {**entry, "days": (day - today).days}
        if not todays and upcoming is None:
            return None

        fragments = [f"{t['name']} festivities" for t in todays]
        if upcoming is not None:
            fragments.append(f"subtle hints of the coming {upcoming['name']}")
        return Contribution(
            plugin=self.name,
            text=", ".join(fragments),
            data={"today": todays, "upcoming": upcoming},
        )
