"""Text as both ledgers store it: one rule for SQLite and PostgreSQL, so both answer alike."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["storable"]

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value`` with NUL and lone surrogates as U+FFFD, in its strings, keys and items.

    PostgreSQL's text and jsonb cannot hold a NUL; neither database's UTF-8 can hold a
    surrogate, which JSON's ``\\udfff`` escapes let through (Python's sqlite3 raises
    UnicodeEncodeError binding one). A valid request may carry either (enhance takes a NUL),
    and an event the ledger is asked to record is recorded, not answered 500 at each
    redelivery. SQLite could keep a NUL; it is replaced there too, so that both backends hold
    and answer the same text. A lookup by such a value finds what was stored under it.
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value
