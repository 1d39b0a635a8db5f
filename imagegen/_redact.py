"""URLs made safe to show: in a log line, an error message or a health report."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url"]

_AUTHORITY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:)?//")


def redact_url(url: str) -> str:
    """``url`` with its user-info replaced by ``***`` and its query and fragment dropped.

    Both can carry credentials (``https://user:pass@host``, ``?token=...``); the scheme, host,
    port and path are kept so that the message still says where. A URL without a scheme
    (``user:pass@host:11434``, as Ollama accepts) is read as a host too.
    """
    has_scheme = _AUTHORITY.match(url) is not None
    try:
        parts = urlsplit(url if has_scheme else f"//{url}")
    except ValueError:  # e.g. an unbalanced IPv6 bracket: nothing can be trusted in it
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    redacted = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return redacted if has_scheme else redacted.removeprefix("//")
