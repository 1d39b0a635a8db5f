"""Whether a PingSource's schedule and time zone pass Knative's validation.

knative/eventing ``pkg/apis/sources/v1/ping_validation.go`` (``PingSourceSpec.Validate``):
``@every`` is refused, the time zone is put before the schedule as ``CRON_TZ=<zone>``, and the
whole is parsed by github.com/robfig/cron v3 with ``SecondOptional | Minute | Hour | Dom |
Month | Dow | Descriptor``. Its ``parser.go`` rule by rule: a ``CRON_TZ=``/``TZ=`` prefix loads
an IANA zone (``time.LoadLocation``: refused as the ``timezone`` field); a descriptor
(``@yearly`` … ``@hourly``); else 5 or 6 whitespace-separated fields (a missing seconds field
is 0), each a comma list of ``*``/``?``, ``N``, ``N-M``, with ``/step``, numbers or month and
weekday names, within the field's bounds.
"""

from __future__ import annotations

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
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _number(text: str, names: dict[str, int]) -> int:
    """``parseIntOrName``: a name, else ``strconv.Atoi`` of a number that is not negative."""
    if text.lower() in names:
        return names[text.lower()]
    if not text.lstrip("+-").isdigit():
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
    if len(range_and_step) == 2:
        if _number(range_and_step[1], {}) == 0:
            raise ValueError(f"step of range should be a positive number: {expr}")
        if len(low_and_high) == 1:  # "N/step" means "N-max/step"
            end = high
    if start < low:
        raise ValueError(f"beginning of range ({start}) below minimum ({low}): {expr}")
    if end > high:
        raise ValueError(f"end of range ({end}) above maximum ({high}): {expr}")
    if start > end:
        raise ValueError(f"beginning of range ({start}) beyond end of range ({end}): {expr}")


def schedule_refusal(schedule: str, timezone: str = "") -> tuple[str, str] | None:
    """(field, reason) Knative refuses the PingSource with, or None where it is admitted."""
    if "@every" in schedule:
        return "schedule", "unsupported descriptor @every"
    if timezone:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return "timezone", f"provided bad location {timezone}"
    spec = schedule.strip()
    if not spec:
        return "schedule", "empty spec string"
    if spec.startswith("@"):
        return None if spec in _DESCRIPTORS else ("schedule", f"unrecognized descriptor: {spec}")
    fields = spec.split()
    if len(fields) not in (5, 6):
        return "schedule", f"expected 5 to 6 fields, found {len(fields)}: {spec}"
    if len(fields) == 5:
        fields.insert(0, "0")  # SecondOptional: the seconds field left out is 0
    try:
        for field, (low, high, names) in zip(fields, _BOUNDS, strict=True):
            for expr in (part for part in field.split(",") if part):
                _range(expr, low, high, names)
    except ValueError as exc:
        return "schedule", str(exc)
    return None
