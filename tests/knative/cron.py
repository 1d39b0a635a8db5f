"""Whether a PingSource's schedule and time zone pass Knative's validation.

knative/eventing ``pkg/apis/sources/v1/ping_validation.go`` (``PingSourceSpec.Validate``, v1.22
line): ``validateDescriptor`` refuses any ``@every``; a non-empty ``spec.timezone`` is put before
the schedule as ``CRON_TZ=<zone> ``; the whole is parsed by github.com/robfig/cron v3.0.1
(``parser.go``, ``Parser.Parse``) with ``SecondOptional | Minute | Hour | Dom | Month | Dow |
Descriptor``, and a parse error that starts with "provided bad location" is reported on the
``timezone`` field, any other on ``schedule``. ``Parse`` rule by rule: an empty spec is refused;
a leading ``CRON_TZ=``/``TZ=`` prefix, up to the first space, names a zone for
``time.LoadLocation`` and is cut off with the spaces after it (the schedule may carry its own
prefix when ``spec.timezone`` is empty; with both, the schedule's prefix is left as a field and
refused); then a spec starting with ``@`` must be exactly a descriptor (``@yearly`` …
``@hourly``); else 5 or 6 whitespace-separated fields (a missing seconds field is 0), each a
comma list of ``*``/``?``, ``N``, ``N-M``, with ``/step``, numbers or month and weekday names,
within the field's bounds.
"""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["schedule_refusal"]

# (min, max, names) of second, minute, hour, day of month, month, day of week.
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i + 1 for i, m in enumerate(_MONTH_NAMES)}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_BOUNDS: tuple[tuple[int, int, dict[str, int]], ...] = (
    (0, 59, {}),
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, _MONTHS),
    (0, 6, _DAYS),
)
# strconv.Atoi: an optional sign, then ASCII digits.
_ATOI = re.compile(r"[+-]?[0-9]+")
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _number(text: str, names: dict[str, int]) -> int:
    """``parseIntOrName``: a name, else ``strconv.Atoi`` of a number that is not negative."""
    if text.lower() in names:
        return names[text.lower()]
    if not _ATOI.fullmatch(text):
        raise ValueError(f"failed to parse int from {text}")
    number = int(text)
    if number < 0:
        raise ValueError(f"negative number ({number}) not allowed: {text}")
    return number


def _range(expr: str, low: int, high: int, names: dict[str, int]) -> None:
    """``getRange``: refuses what v3 refuses (bounds, order, hyphens, slashes, a zero step)."""
    range_and_step = expr.split("/")
    low_and_high = range_and_step[0].split("-")
    if low_and_high[0] in ("*", "?"):
        start, end = low, high
    else:
        start = _number(low_and_high[0], names)
        if len(low_and_high) > 2:
            raise ValueError(f"too many hyphens: {expr}")
        end = _number(low_and_high[1], names) if len(low_and_high) == 2 else start
    if len(range_and_step) > 2:
        raise ValueError(f"too many slashes: {expr}")
    step = 1
    if len(range_and_step) == 2:
        step = _number(range_and_step[1], {})
        if len(low_and_high) == 1:  # "N/step" means "N-max/step"
            end = high
    if start < low:
        raise ValueError(f"beginning of range ({start}) below minimum ({low}): {expr}")
    if end > high:
        raise ValueError(f"end of range ({end}) above maximum ({high}): {expr}")
    if start > end:
        raise ValueError(f"beginning of range ({start}) beyond end of range ({end}): {expr}")
    if step == 0:
        raise ValueError(f"step of range should be a positive number: {expr}")


def _load_location(name: str) -> str | None:
    """Go's ``time.LoadLocation``: None where it loads, else its error."""
    if name in ("", "UTC", "Local"):
        return None
    if ".." in name or name[0] in "/\\":
        return "time: invalid location name"
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name}"
    return None


def _parse(spec: str) -> str | None:
    """robfig/cron v3 ``Parser.Parse`` with Knative's options: None, or the error it returns."""
    if not spec:
        return "empty spec string"
    if spec.startswith(("TZ=", "CRON_TZ=")):
        space = spec.find(" ")
        if space < 0:
            # spec[eq+1 : -1] in Go: the slice panics, and the webhook call fails.
            return "slice bounds out of range (the parser panics: no space after the time zone)"
        zone = spec[spec.index("=") + 1 : space]
        if (error := _load_location(zone)) is not None:
            return f"provided bad location {zone}: {error}"
        spec = spec[space:].strip()
    if spec.startswith("@"):  # parseDescriptor: an exact match, no trimming
        return None if spec in _DESCRIPTORS else f"unrecognized descriptor: {spec}"
    fields = spec.split()
    if len(fields) not in (5, 6):
        return f"expected 5 to 6 fields, found {len(fields)}: [{' '.join(fields)}]"
    if len(fields) == 5:
        fields.insert(0, "0")  # SecondOptional: the seconds field left out is 0
    try:
        for field, (low, high, names) in zip(fields, _BOUNDS, strict=True):
            for expr in (part for part in field.split(",") if part):
                _range(expr, low, high, names)
    except ValueError as exc:
        return str(exc)
    return None


def schedule_refusal(schedule: str, timezone: str = "") -> tuple[str, str] | None:
    """(field, reason) Knative refuses the PingSource with first, or None where it is admitted."""
    if "@every" in schedule:
        return "schedule", "unsupported descriptor @every"
    if timezone:
        schedule = f"CRON_TZ={timezone} {schedule}"
    error = _parse(schedule)
    if error is None:
        return None
    return ("timezone" if error.startswith("provided bad location") else "schedule"), error
