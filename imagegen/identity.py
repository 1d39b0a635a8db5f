"""Who a request is: its generation id and its time, each decided here and nowhere else.

A redelivered event must map to the same generation and the same keys, so both come from the
event when there is one: the id from ``subject`` (else ``source`` + ``id``), the time from
``time``. A caller may name them in the data instead; a plain call that names neither gets a
new id and the current time.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from imagegen.errors import InvalidRequest
from imagegen.events import failure_cause, name_uuid
from imagegen.stages import Call

__all__ = [
    "GENERATION_ID_PATTERN",
    "MAX_AHEAD",
    "aware",
    "derive_generation_id",
    "event_time",
    "generation_id",
    "identify",
    "key_time",
    "new_generation_id",
    "not_ahead",
    "parse_rfc3339",
    "request_time",
    "stage_time",
    "started_times",
    "valid_generation_id",
]

GENERATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
_GENERATION_ID = re.compile(GENERATION_ID_PATTERN)
MIN_YEAR, MAX_YEAR = 1970, 2999
# How far ahead of this clock a generation may start. The request's time names its storage day
# and its place in the history and the gallery, newest first: one dated years ahead would head
# both for good. A caller's clock may run a little ahead of ours; five minutes is the skew
# Kerberos tolerates by default (MIT krb5's clockskew), far more than NTP leaves.
MAX_AHEAD = timedelta(minutes=5)


def new_generation_id() -> str:
    """A fresh random generation id (32 lowercase hex characters)."""
    return uuid.uuid4().hex


def derive_generation_id(source: str, event_id: str) -> str:
    """The generation id of a request event that names none: stable for ``source`` + ``id``.

    ``uuid.uuid5`` of the event's name (:func:`imagegen.events.failure_cause`, the name a
    failure gives the event it answers), one per pair, so two events never share a
    generation; a name holding a lone surrogate (an event's JSON may escape one) is hashed as
    it came.
    """
    return name_uuid(failure_cause(source, event_id))


def valid_generation_id(value: str) -> bool:
    """Whether ``value`` is a generation id (it names storage keys, so it is strict)."""
    # fullmatch: Python's ``$`` also matches before a final newline, so ``match`` took
    # "id\n" (a ``ce-subject: id%0A``), which the models' pattern (pydantic's engine) refuses.
    return _GENERATION_ID.fullmatch(value) is not None


def stage_time() -> datetime:
    """Now, in UTC, to the millisecond: when a stage did its work, kept with what it wrote
    (``enhanced_at``, ``rendered_at``, ``persisted_at``) so that every delivery says the same."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def aware(value: datetime) -> datetime:
    """``value`` with a time zone: a naive time is taken as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def key_time(value: datetime) -> datetime:
    """``value`` as a request time: aware, in a four-digit year the storage keys can hold.

    Raises:
        ValueError: for an instant outside the years 1970-2999 in UTC (its offset taken off).
    """
    value = aware(value)
    # The UTC date names the storage keys (yyyy/mm/dd): keep it a plausible four-digit year.
    # The year is the instant's in UTC, not the one written with its offset: 00:30+01:00 on
    # 1 January 1970 is 23:30 on 31 December 1969, and would be stored under 1969/12/31/.
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # year 1 ahead of UTC, 9999 behind it
        utc = None
    if utc is None or not MIN_YEAR <= utc.year <= MAX_YEAR:
        raise ValueError(f"must be between {MIN_YEAR} and {MAX_YEAR} (UTC)")
    return value


def not_ahead(value: datetime, *, now: datetime | None = None) -> datetime:
    """``value`` as the time a generation starts at: no more than :data:`MAX_AHEAD` after
    ``now`` (default: this clock).

    Only where a generation starts (enhance's request, a direct render): the stages after it
    take the time it was given, whatever their own clocks say, as every redelivery must.

    Raises:
        ValueError: ``value`` is further ahead.
    """
    now = now or datetime.now(UTC)
    if aware(value) - now > MAX_AHEAD:
        minutes = int(MAX_AHEAD.total_seconds() // 60)
        raise ValueError(f"must not be more than {minutes} minutes ahead of the current time")
    return value


def generation_id(
    declared: str | None, attributes: Mapping[str, str], *, starts: bool
) -> str | None:
    """The generation a request belongs to.

    Args:
        declared: The id the data names, if any.
        attributes: The CloudEvents attributes (empty for a plain call).
        starts: Whether the stage starts generations (it may make up an id).

    Raises:
        InvalidRequest: when the data and the subject disagree, or the id is malformed.
    """
    subject = attributes.get("subject")
    if declared and subject and declared != subject:
        raise InvalidRequest(
            f"subject {subject!r} does not match generation_id {declared!r}",
            errors=[{"field": "subject", "message": "must equal data.generation_id"}],
        )
    found = declared or subject
    if found is None and starts:
        if "source" in attributes and "id" in attributes:
            found = derive_generation_id(attributes["source"], attributes["id"])
        else:
            found = new_generation_id()
    if found is not None and not valid_generation_id(found):
        raise InvalidRequest(
            f"invalid generation id {found!r}",
            errors=[{"field": "subject", "message": f"must match {GENERATION_ID_PATTERN}"}],
        )
    return found


def request_time(declared: datetime | None, fallback: datetime | None = None) -> datetime:
    """The request's time: the data's, else ``fallback`` (the event's), else now; never naive."""
    return aware(declared or fallback or datetime.now(UTC))


# RFC 3339, section 5.6 (date-time): "T" and "Z" in either case (its note to section 5.6), any
# number of fraction digits, an offset of hours and minutes. Python's ISO 8601 reader takes
# more (a date alone, a space, offsets with seconds) that a CloudEvents SDK refuses, and
# refuses what RFC 3339 allows (a lower-case "t", a leap second).
_RFC3339 = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<minute>\d{2}:\d{2}):(?P<second>\d{2})"
    r"(?P<fraction>\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def parse_rfc3339(value: str, *, round_up: bool = False) -> datetime:
    """An RFC 3339 timestamp, aware; a leap second (``:60``) is the last microsecond before
    the next minute (Python has none), so the order of times is kept.

    Its fraction is read to the microsecond, Python's finest; digits beyond it (nanoseconds, as
    Go writes them) are dropped, or, with ``round_up``, raise it to the next microsecond: what a
    bound compared with times kept to the microsecond needs to stay on its side (24.5575141 is
    after 24.557514, so "at or after" it is at or after 24.557515).

    Raises:
        ValueError: ``value`` is no RFC 3339 timestamp, or a leap second at another minute
            than 23:59 UTC.
    """
    found = _RFC3339.fullmatch(value)
    if found is None:
        raise ValueError(f"{value[:40]!r} is not an RFC 3339 timestamp")
    offset = found["offset"].upper().replace("Z", "+00:00")
    second, fraction = found["second"], found["fraction"] or ""
    leap = second == "60"
    if leap:
        second, fraction = "59", ".999999"
    finer = fraction[7:].strip("0") != ""  # a nonzero digit beyond the microsecond
    fraction = fraction[:7]  # "." and six digits
    parsed = datetime.fromisoformat(f"{found['date']}T{found['minute']}:{second}{fraction}{offset}")
    # RFC 3339, section 5.7: a leap second is the last of a UTC day, at the same instant
    # around the globe (23:59:60Z is 08:59:60+09:00 the next day). At any other minute it
    # names no instant.
    if leap and _utc_minute(parsed) != (23, 59):
        raise ValueError(f"{value[:40]!r}: a leap second only ends the minute 23:59 UTC")
    if finer and round_up and parsed.replace(tzinfo=None) < datetime.max:
        parsed += timedelta(microseconds=1)  # not past the year 9999, out of every range anyway
    return parsed


def _utc_minute(value: datetime) -> tuple[int, int] | None:
    """The hour and minute of ``value`` in UTC; None where UTC has no such year."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        return None
    return utc.hour, utc.minute


def event_time(attributes: Mapping[str, str]) -> datetime | None:
    """The event's ``time`` attribute, parsed (None when absent).

    Raises:
        InvalidRequest: naming ``time`` when it is not an RFC 3339 timestamp (an empty one
            included), or out of range.
    """
    value = attributes.get("time")
    if value is None:
        return None
    try:
        parsed = parse_rfc3339(value)
    except ValueError:
        raise InvalidRequest(
            f"event time {value[:40]!r} is not an RFC 3339 timestamp",
            errors=[{"field": "time", "message": "not an RFC 3339 timestamp"}],
        ) from None
    try:
        return key_time(parsed)
    except ValueError as exc:
        raise InvalidRequest(
            f"event time {value[:40]!r}: {exc}", errors=[{"field": "time", "message": str(exc)}]
        ) from None


def started_times(times: Mapping[str, datetime | None], *, now: datetime | None = None) -> None:
    """Refuse the times a generation would start at that are ahead of this clock
    (:func:`not_ahead`): ``times`` by the field each comes from (None: not given).

    Raises:
        InvalidRequest: naming each field further ahead than :data:`MAX_AHEAD`.
    """
    now = now or datetime.now(UTC)
    errors = []
    for field, value in times.items():
        if value is None:
            continue
        try:
            not_ahead(value, now=now)
        except ValueError as exc:
            errors.append({"field": field, "message": str(exc)})
    if errors:
        fields = ", ".join(e["field"] for e in errors)
        raise InvalidRequest(f"a request time ahead of the current time: {fields}", errors=errors)


def identify(data: object, attributes: Mapping[str, str] | None = None, *, starts: bool) -> Call:
    """The :class:`Call` of a request with validated ``data`` (a model, or anything for a sink).

    Raises:
        InvalidRequest: the generation id is malformed or disagrees with the subject; where a
            generation starts, ``time`` is no RFC 3339 timestamp or out of range, or it or the
            data's ``requested_at`` is ahead of this clock (:func:`started_times`).
    """
    attributes = MappingProxyType(dict(attributes or {}))
    declared = getattr(data, "generation_id", None)
    gid = generation_id(declared, attributes, starts=starts)
    when = None
    if starts:
        requested_at, sent_at = getattr(data, "requested_at", None), event_time(attributes)
        # Both, each by its own name: the data's names the generation's time, and the event's
        # when the data has none, or, for a replay, its place in the history (the ledger lists
        # a replay at its event's time).
        started_times({"requested_at": requested_at, "time": sent_at})
        when = request_time(requested_at, sent_at)
    return Call(generation_id=gid, requested_at=when, attributes=attributes)
