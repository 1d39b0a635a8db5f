"""Today's holidays and the nearest upcoming one, from the ``holidays`` library.

Movable feasts (Easter, Thanksgiving, lunar new year...) come from the library's calendars, so
they are right every year. Countries are ISO codes, optionally with a subdivision: ``US``,
``DE-BY``. Holiday names are in English where the library has an English translation (option
``language`` picks another), so the prompt reads the same on every host.

Options: ``countries`` (overrides ``settings.holiday_countries``), ``horizon_days`` (how far
ahead an upcoming holiday counts, default 14), ``language``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import holidays

from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.settings import Settings
from imagegen_plugins._options import invalid_option, option_float, option_list, option_str

__all__ = ["DEFAULT_HORIZON_DAYS", "HolidayPlugin", "holidays_between"]

DEFAULT_HORIZON_DAYS = 14

log = logging.getLogger("imagegen_plugins.holiday")

# Configured countries the library does not know: named once in the log, then left out. The
# warm-up names them at start; a request still uses the others.
_UNKNOWN_CONFIGURED: set[str] = set()


def _pick_language(wanted: str, supported: tuple[str, ...], default: str | None) -> str | None:
    if wanted in supported:
        return wanted
    prefix = wanted.split("_")[0]
    return next((lang for lang in supported if lang.split("_")[0] == prefix), default)


_Calendar = tuple[tuple[date, tuple[str, ...]], ...]
_CALENDARS: dict[tuple[str, str | None, int], _Calendar] = {}
_MAX_CALENDARS = 256  # requests choose countries and languages: the oldest go first


def _year(code: str, language: str | None, year: int) -> _Calendar:
    """The holidays of ``code`` (``CC`` or ``CC-SUBDIV``) in ``year``, by date; built once."""
    key = (code, language, year)
    calendar = _CALENDARS.get(key)
    if calendar is None:
        calendar = _build_year(code, language, year)
        if len(_CALENDARS) >= _MAX_CALENDARS:
            _CALENDARS.pop(next(iter(_CALENDARS)), None)
        _CALENDARS[key] = calendar
    return calendar


def _build_year(code: str, language: str | None, year: int) -> _Calendar:
    country, _, subdiv = code.upper().partition("-")
    probe = holidays.country_holidays(country, subdiv=subdiv or None)
    lang = _pick_language(
        language or "en_US", tuple(probe.supported_languages), probe.default_language
    )
    calendar = holidays.country_holidays(country, subdiv=subdiv or None, years=year, language=lang)
    return tuple((day, tuple(calendar.get_list(day))) for day in sorted(calendar))


def holidays_between(
    code: str, start: date, end: date, language: str | None = None
) -> list[tuple[date, str]]:
    """Every (date, name) of country ``code`` from ``start`` to ``end``, both included.

    Raises:
        NotImplementedError: the country or subdivision is unknown to the library.
    """
    found: list[tuple[date, str]] = []
    for year in range(start.year, end.year + 1):
        for day, names in _year(code, language, year):
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
        """
        today = datetime.now(ZoneInfo(self.settings.timezone)).date()
        for code in self.settings.holiday_countries:
            try:
                holidays_between(code, today, today + timedelta(days=DEFAULT_HORIZON_DAYS))
            except NotImplementedError as exc:
                raise ValueError(f"holiday_countries: {exc}") from None

    async def contribute(self, context: PluginContext) -> Contribution | None:
        """Holidays on ``context.now``'s date and within the horizon after it."""
        options = context.options
        requested = option_list(options, self.name, "countries")
        countries = requested if requested is not None else self.settings.holiday_countries
        horizon = int(
            option_float(options, self.name, "horizon_days", DEFAULT_HORIZON_DAYS, low=0, high=366)
        )
        language = option_str(options, self.name, "language")
        today = context.now.date()
        years = range(today.year, (today + timedelta(days=horizon)).year + 1)
        args = (countries, requested is not None, today, horizon, language)
        if all((code, language, year) in _CALENDARS for code in countries for year in years):
            return self._contribution(*args)  # look-ups in built calendars: on the loop
        # The library computes a year's calendar, and may first import a country's module:
        # tenths of a second, off the event loop (once per country, language and year).
        return await asyncio.to_thread(self._contribution, *args)

    def _contribution(
        self,
        countries: list[str],
        requested: bool,
        today: date,
        horizon: int,
        language: str | None,
    ) -> Contribution | None:
        todays: list[dict[str, Any]] = []
        upcoming: dict[str, Any] | None = None
        for code in countries:
            try:
                found = holidays_between(code, today, today + timedelta(days=horizon), language)
            except NotImplementedError as exc:
                if requested:
                    raise invalid_option(self.name, "countries", str(exc)) from None
                if code not in _UNKNOWN_CONFIGURED:
                    _UNKNOWN_CONFIGURED.add(code)
                    log.warning("holiday_countries: %s; %s left out", exc, code)
                continue
            for day, name in found:
                entry = {"name": name, "date": day.isoformat(), "country": code}
                if day == today:
                    if all(t["name"] != name for t in todays):
                        todays.append(entry)
                elif upcoming is None or day.isoformat() < upcoming["date"]:
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
