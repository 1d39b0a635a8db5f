"""What a ``Retry-After`` header asks for, read as RFC 9110 says: by the webhook dispatcher of
a receiver's answer, and by enhance of an Ollama (or a proxy in front of it) at capacity."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = ["RETRY_AFTER_MAX", "retry_after"]

# The longest wait a Retry-After is taken at: a server cannot park a caller for months.
RETRY_AFTER_MAX = 86400.0


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait, at most :data:`RETRY_AFTER_MAX`.

    RFC 9110, section 10.2.3: delay-seconds (digits only) or an HTTP-date (IMF-fixdate, or the
    obsolete RFC 850 and asctime forms a recipient should still read; a date in the past is no
    wait). Anything else is None: the header is ignored, not the reply.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), RETRY_AFTER_MAX)  # float(): any length, at worst inf
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime carries no zone; every HTTP-date is in UTC
        when = when.replace(tzinfo=UTC)
    wait = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(0.0, wait), RETRY_AFTER_MAX)
