"""Keyset pagination cursors: opaque to callers, a page's last position to the ledger."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from imagegen.errors import InvalidRequest
from imagegen.identity import valid_generation_id
from imagegen.ledger.fold import utc

__all__ = ["decode_cursor", "encode_cursor"]


def encode_cursor(at: datetime, generation_id: str) -> str:
    """An opaque keyset position: the last row's ``(LISTED_KEY, generation_id)``."""
    raw = json.dumps([utc(at).isoformat(), generation_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position in ``cursor``.

    Raises:
        InvalidRequest: ``cursor`` was not handed out by :func:`encode_cursor`.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, gid = json.loads(raw)
        if not (isinstance(gid, str) and valid_generation_id(gid)):
            raise ValueError("no generation id")  # never a row's: no string a database can bind
        return utc(datetime.fromisoformat(at)), gid
    except (binascii.Error, ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(
            "cursor is not one this ledger handed out",
            errors=[{"field": "cursor", "message": "not a cursor from a previous page"}],
        ) from exc
