"""The ledger's write statements and history's key, written once for both dialects (``:name``
parameters).

The upsert is :mod:`imagegen.ledger.fold`'s rules as SQL, so that concurrent writers of one
generation serialise on its row instead of reading and writing it in two steps.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from imagegen.ledger.fold import (
    DESCRIPTIVE_COLUMNS,
    ONCE_COLUMNS,
    REQUEST_COLUMNS,
    STAGE_COLUMNS,
    Change,
)

__all__ = [
    "CANCEL_FAILED",
    "GENERATION_COLUMNS",
    "INSERT_DELIVERY",
    "INSERT_EVENT",
    "LISTED_KEY",
    "PERSISTED_RECORDED",
    "PRUNE",
    "RECORD",
    "REQUEST_EVENT_COLUMNS",
    "UPSERT_GENERATION",
    "upsert_params",
]


# In the upsert, ``g`` is the generation's row as it stands, ``excluded`` what the event says.
def _first_wins(column: str) -> str:
    return f"{column} = COALESCE(g.{column}, excluded.{column})"


def _first_request_wins(column: str) -> str:
    # The event is a generation.requested (it sets requested_at) and the row has none recorded
    # yet; SET reads g as it was before this update, in both dialects.
    return (
        f"{column} = CASE WHEN g.requested_at IS NULL AND excluded.requested_at IS NOT NULL "
        f"THEN excluded.{column} ELSE g.{column} END"
    )


# The row describes a request already: one is recorded (requested_at) and the image's size is
# said. Every valid generation.requested says its size (1024 by default); one whose data is
# invalid says nothing of the image (fold: only where its messages go), so it leaves the row to
# the first valid request recorded after it, the one enhance starts the image from.
_DESCRIBED = "g.requested_at IS NOT NULL AND g.width IS NOT NULL"

# The event is a generation.requested and the row describes one already: a second request
# naming the generation (another source and id, a platform's retry with another prompt).
_LATER_REQUEST = f"excluded.requested_at IS NOT NULL AND {_DESCRIBED}"

# The event is the generation's request, the one REQUEST_EVENT_COLUMNS name: the first
# recorded, or a valid one (it says the size) where the row describes none yet (those recorded
# before it were invalid).
_TAKES_REQUEST = (
    "excluded.requested_at IS NOT NULL AND (g.requested_at IS NULL "
    f"OR (excluded.width IS NOT NULL AND NOT ({_DESCRIBED})))"
)


def _most_advanced_wins(column: str) -> str:
    # Of two valid requests the first recorded wins: the row describes the request replay
    # sends (REQUEST_EVENT_COLUMNS), whichever replica recorded it.
    return (
        f"{column} = CASE WHEN {_LATER_REQUEST} THEN g.{column} "
        f"WHEN excluded.status_rank >= g.status_rank "
        f"THEN COALESCE(excluded.{column}, g.{column}) "
        f"ELSE COALESCE(g.{column}, excluded.{column}) END"
    )


def _first_wins_of_requests(column: str) -> str:
    # ONCE_COLUMNS: replay_of is said by a request (and every stage's output), not by a later
    # request; the failure's columns by no request.
    return (
        f"{column} = CASE WHEN {_LATER_REQUEST} THEN g.{column} "
        f"ELSE COALESCE(g.{column}, excluded.{column}) END"
    )


def _request_wins(column: str) -> str:
    return f"{column} = CASE WHEN {_TAKES_REQUEST} THEN excluded.{column} ELSE g.{column} END"


# Which generation.requested the row describes, by its source and id (migration 0008): the
# first valid one recorded (else the first recorded), set in the same upsert that takes its
# fields, so it names that request whichever of two requests recorded at once drew the lower
# seq. Replay sends it (SqlLedger.generation_events). Where the messages go (REQUEST_COLUMNS)
# is the first request's, valid or not: its caller has been told it started.
REQUEST_EVENT_COLUMNS = ("request_source", "request_id")

# History's order and cursor (newest first). listed_at alone is NULL in rows a replica older
# than migration 0002 inserts during a rolling update; those are listed by created_at. Written
# as migration 0005's indexes write it: any other spelling and neither database uses them.
LISTED_KEY = "COALESCE(listed_at, created_at)"
GENERATION_COLUMNS = (
    "generation_id",
    "status",
    "status_rank",
    "created_at",
    "listed_at",
    "updated_at",
    *STAGE_COLUMNS,
    *DESCRIPTIVE_COLUMNS,
    *ONCE_COLUMNS,
    *REQUEST_COLUMNS,
    *REQUEST_EVENT_COLUMNS,
)
_INTO = f"INSERT INTO generations AS g ({', '.join(GENERATION_COLUMNS)}) "
_ROW = ", ".join(":" + c for c in GENERATION_COLUMNS)
# The rules of imagegen.ledger.fold, as one statement: concurrent writers of one generation
# serialise on its row, and each sees the row as the one before it left it. (Built from the
# fixed column names above, never from input.)
_ON_CONFLICT = (
    "ON CONFLICT (generation_id) DO UPDATE SET "
    "status = CASE WHEN excluded.status_rank > g.status_rank "
    "THEN excluded.status ELSE g.status END, "
    "status_rank = CASE WHEN excluded.status_rank > g.status_rank "
    "THEN excluded.status_rank ELSE g.status_rank END, "
    "created_at = CASE WHEN excluded.created_at < g.created_at "
    "THEN excluded.created_at ELSE g.created_at END, "
    "updated_at = excluded.updated_at, "
    # listed_at: set by the first event, never moved (history's keyset pages rely on it). A row
    # without one (inserted by a replica older than migration 0002) is listed by its created_at
    # (LISTED_KEY): that is the value it keeps, not this event's time, or it would move.
    "listed_at = COALESCE(g.listed_at, g.created_at), "
    + ", ".join(
        [_first_wins(c) for c in STAGE_COLUMNS]
        + [_first_wins_of_requests(c) for c in ONCE_COLUMNS]
        + [_most_advanced_wins(c) for c in DESCRIPTIVE_COLUMNS]
        + [_first_request_wins(c) for c in REQUEST_COLUMNS]
        + [_request_wins(c) for c in REQUEST_EVENT_COLUMNS]
    )
)
UPSERT_GENERATION = f"{_INTO}VALUES ({_ROW}) {_ON_CONFLICT} RETURNING *"
# No conflict target: an event is unique by (source, id) under a different index in each
# dialect (PostgreSQL: by their digests, migration 0006; SQLite: by the values), and an insert
# without a target has every unique index for its arbiter (PostgreSQL's INSERT, "ON CONFLICT
# Clause"; SQLite's "upsert" page: the last ON CONFLICT clause may omit it). ledger_events has
# no other unique index than its seq, which the insert never sets.
# received: the data as it came, where it held text the databases store otherwise (migration
# 0010, _text.as_received); NULL where data is it. A replica older than 0010 inserts none.
INSERT_EVENT = (
    "INSERT INTO ledger_events "
    "(source, id, type, subject, generation_id, time, time_attribute, recorded_at, data, "
    "received) "
    "VALUES (:source, :id, :type, :subject, :generation_id, :time, :time_attribute, "
    ":recorded_at, :data, :received) "
    "ON CONFLICT DO NOTHING RETURNING seq"
)
# Both as one statement, one round trip (PostgreSQL: SQLite has no INSERT inside WITH). The
# generation's row is only written when the event is new: a redelivery changes nothing and
# returns no row. The guard is on the row the INSERT selects, not on its DO UPDATE, which
# would leave the insert unguarded: a duplicate naming a generation with no row yet (a caller
# reusing a request's source and id for another) would create that row, and its webhooks.
RECORD = (
    f"WITH event AS ({INSERT_EVENT}), "  # noqa: S608 - fixed parts
    f"generation AS ({_INTO}SELECT {_ROW} WHERE EXISTS (SELECT 1 FROM event) "
    f"{_ON_CONFLICT} RETURNING *) "
    "SELECT EXISTS (SELECT 1 FROM event) AS fresh, generation.* "
    "FROM (SELECT 1) AS one LEFT JOIN generation ON true"
)
CANCEL_FAILED = (
    "UPDATE webhook_deliveries SET state = 'cancelled', last_error = 'the image was persisted', "
    "next_attempt_at = :now "
    "WHERE generation_id = :gid AND event = 'failed' AND state = 'pending'"
)
PERSISTED_RECORDED = (
    "SELECT 1 AS found FROM ledger_events WHERE generation_id = :gid AND type = :type LIMIT 1"
)
# receiver: who the message goes to (_sql._receiver of its URL, migration 0009), by which a
# claim finds the receivers being sent to. A replica older than 0009 inserts none.
INSERT_DELIVERY = (
    "INSERT INTO webhook_deliveries "
    "(msg_id, generation_id, event, url, receiver, payload, next_attempt_at, created_at) "
    "VALUES (:msg_id, :generation_id, :event, :url, :receiver, :payload, :now, :now) "
    "ON CONFLICT (msg_id) DO NOTHING"
)


# What prune deletes, by name (each by an indexed time: migrations 0001 and 0004).
# Webhook messages go by their age whatever their state: one still pending after the retention
# (webhooks off, a receiver that never answers) is about a generation already forgotten, and
# would be sent that late. Except one a dispatcher may be sending now, its lease
# (sending_until, migration 0009) not over by the cutoff: deleted under the send, its outcome
# would find no row and its receiver's mark would go with it, so another message could be sent
# to that receiver at once. Leases last minutes and the cutoff is days back, so this keeps
# only messages being sent (or marked by a replica that stopped within the retention, which a
# later prune deletes), and compares two stored times, with no clock of either database. A
# claim that holds the row as prune reaches it (PostgreSQL) is waited for, and the row read
# again as that claim left it (READ COMMITTED's rule for an UPDATE or DELETE), lease and all.
PRUNE = {
    "events": "DELETE FROM ledger_events WHERE recorded_at < :before",
    "generations": "DELETE FROM generations WHERE updated_at < :before",
    "deliveries": "DELETE FROM webhook_deliveries WHERE created_at < :before "
    "AND (sending_until IS NULL OR sending_until < :before)",
}


def upsert_params(
    change: Change, now: datetime, *, event: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The parameters of :data:`UPSERT_GENERATION` (and :data:`RECORD`) for ``change``, made by
    the event whose ``(source, id)`` is ``event``."""
    params: dict[str, Any] = dict.fromkeys(GENERATION_COLUMNS)
    params.update(change.fields)
    params.update(
        generation_id=change.generation_id,
        status=change.status,
        status_rank=change.rank,
        created_at=change.at,
        listed_at=change.at,
        updated_at=now,
    )
    params[change.stage_column] = change.at
    if event is not None and change.stage_column == "requested_at":
        params["request_source"], params["request_id"] = event
    return params
