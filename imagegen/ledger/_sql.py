"""The ledger over SQL: one implementation, two dialects (:mod:`.postgres`, :mod:`.sqlite`).

Statements are written once, with ``:name`` parameters; a dialect rewrites the parameter style
and adapts values (JSON, times) to its column types. Both databases understand the same
``INSERT ... ON CONFLICT`` upsert, row-value comparisons and ``RETURNING``.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Literal, Protocol, TextIO, TypeVar

from pydantic import ValidationError

from imagegen.errors import DependencyUnavailable, InternalError, InvalidRequest
from imagegen.events import GENERATION_FAILED, IMAGE_DERIVED, IMAGE_PERSISTED
from imagegen.ledger._cursor import decode_cursor, encode_cursor
from imagegen.ledger._migrate import CREATE_TABLE, migrations, statements
from imagegen.ledger._statements import (
    CANCEL_FAILED,
    INSERT_DELIVERY,
    INSERT_EVENT,
    LISTED_KEY,
    PERSISTED_RECORDED,
    PRUNE,
    UPSERT_GENERATION,
    upsert_params,
)
from imagegen.ledger._text import as_received
from imagegen.ledger.fold import (
    CHAIN_ORDER,
    STAGE_COLUMNS,
    Change,
    due_webhooks,
    fold,
    made_good,
    message_id,
    utc,
)
from imagegen.ledger.models import (
    Delivery,
    Generation,
    GenerationDetail,
    GenerationPage,
    IngestResult,
    LedgerEvent,
    Status,
    TimelineEntry,
    WebhookMessage,
)
from imagegen.ledger.webhooks import receiver

__all__ = [
    "AFTER",
    "BUSY",
    "BUSY_RETRY_AFTER",
    "HISTORY_PAGE",
    "JSON_COLUMNS",
    "MAX_PAGE",
    "TIME_COLUMNS",
    "Cursor",
    "SqlLedger",
    "Unreadable",
]

logger = logging.getLogger(__name__)
_M = TypeVar("_M", Generation, LedgerEvent, TimelineEntry)

MAX_PAGE = 500
JSON_COLUMNS = frozenset({"data", "error", "keys", "urls", "webhook_events"})
TIME_COLUMNS = frozenset(
    {
        *STAGE_COLUMNS,
        "time",
        "time_attribute",
        "recorded_at",
        "created_at",
        "listed_at",
        "listed_key",
        "updated_at",
        "next_attempt_at",
        "delivered_at",
        "sending_until",
    }
)
_EXPORT_BATCH = 1000
# What a write that met another (a deadlock, a lock not granted in time: PostgreSQL's SQLSTATE
# class 40 and 55P03; SQLite's lock held past its busy timeout) answers, retryable, on both.
BUSY = (
    "the ledger database could not answer now (a lock held by another write or session was"
    " not granted in time); retry"
)
BUSY_RETRY_AFTER = 1.0
# A page of history, its conditions in ``{where}``; AFTER, the condition a cursor adds. Its
# second part says nothing the first does not: SQLite seeks an index on an expression by a
# range on that expression, never by a row value (it would read the index from its start).
# ``derived`` (fold.made_good) is looked up only for a stored generation that keeps a failure,
# by the index on ledger_events (generation_id, time).
_DERIVED = (
    "CASE WHEN failed_stage IS NOT NULL AND status = 'persisted' AND EXISTS (SELECT 1 FROM "  # noqa: S608 - fixed parts
    "ledger_events AS d WHERE d.generation_id = generations.generation_id "
    f"AND d.type = '{IMAGE_DERIVED}') THEN 1 ELSE 0 END"
)
HISTORY_PAGE = (
    f"SELECT *, {LISTED_KEY} AS listed_key, {_DERIVED} AS derived "  # noqa: S608
    f"FROM generations WHERE {{where}} "
    f"ORDER BY {LISTED_KEY} DESC, generation_id DESC LIMIT :limit"
)
# The request the generation's row describes (migration 0008: REQUEST_EVENT_COLUMNS), then the
# order recorded. Not the lowest seq alone: on PostgreSQL seq is drawn before the row is locked,
# so of two requests recorded at once the one with the lower seq may upsert second. A row
# without the columns (recorded before 0008, or by a replica older than it) falls back to seq.
_TOOK_REQUEST = "CASE WHEN e.source = g.request_source AND e.id = g.request_id THEN 0 ELSE 1 END"
AFTER = f"({LISTED_KEY}, generation_id) < (:after_at, :after_id) AND {LISTED_KEY} <= :after_at"


@dataclass(frozen=True)
class Unreadable:
    """A stored value its column's type cannot be read from (not written by this ledger: by
    hand, another program, a damaged file); the row it is in is reported, never half-read."""

    column: str


class _UnreadableRow(ValueError):
    """A row no model of this version reads: the columns at fault, in its message."""

    def __init__(self, columns: list[str]) -> None:
        super().__init__(", ".join(dict.fromkeys(columns)) or "the row")


class Cursor(Protocol):
    """What a dialect's transaction offers: statements in, rows (as dicts) out."""

    def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]: ...

    def run(self, sql: str, params: dict[str, Any]) -> int: ...


class SqlLedger(ABC):
    """The ledger's operations over a dialect's transactions; see :class:`~.store.Ledger`."""

    dialect: str
    skip_locked: str = ""  # appended to the delivery claim's row selection
    where: str = "database"  # how an error names this ledger (a file's path, never a URL)

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Cursor]:
        """A transaction: committed when the block ends, rolled back when it raises."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections."""

    def statement(self) -> AbstractContextManager[Cursor]:
        """Where a read runs: one that takes no write lock (SQLite: a deferred transaction, which
        WAL lets read while another process writes; PostgreSQL: autocommit statements)."""
        return self.transaction()

    # Whether ledger_migrations exists (a row when it does): read before anything is written.
    migrations_table: str = ""
    newer_schema: tuple[int, int] | None = None
    """(the database's schema version, the highest this release knows) where a newer release
    migrated the database; None otherwise. Set at open."""

    def _lock_migrations(self, db: Cursor) -> None:  # noqa: B027 - a hook: nothing here
        """Make replicas that start together wait for each other's migrations."""

    def _unbounded(self, db: Cursor) -> None:  # noqa: B027 - a hook: nothing here
        """Lift, for this transaction, any time limit the requests' statements have: a bulk
        delete from a command or a job, which answers no request."""

    def _applied(self, db: Cursor) -> set[int]:
        """The versions ``ledger_migrations`` records (none before the first migration)."""
        if not db.query(self.migrations_table, {}):
            return set()
        return {row["version"] for row in db.query("SELECT version FROM ledger_migrations", {})}

    def _migrate(self) -> None:
        """Apply the migrations not applied yet, each once, in order, in one transaction.

        The versions applied are read first, by a read that takes no write lock: opening a
        ledger with nothing to apply (every open but the first after an upgrade) never waits
        for another process's write. Only when one is pending is the lock taken, and the
        versions read again under it: another process may have applied them meanwhile.
        """
        known = migrations(self.dialect)
        with self.statement() as db:
            done = self._applied(db)
        if not {migration.version for migration in known} <= done:
            with self.transaction() as db:
                self._lock_migrations(db)
                db.run(CREATE_TABLE, {})
                done = self._applied(db)
                for migration in known:
                    if migration.version in done:
                        continue
                    for statement in statements(migration.sql):
                        db.run(statement, {})
                    db.run(
                        "INSERT INTO ledger_migrations (version, name, applied_at) "
                        "VALUES (:version, :name, :at)",
                        {
                            "version": migration.version,
                            "name": migration.name,
                            "at": datetime.now(UTC).isoformat(),
                        },
                    )
        newest, highest = max(done, default=0), max(m.version for m in known)
        self.newer_schema = (newest, highest) if newest > highest else None
        if newest > highest:
            # Not refused: a replica of the release before keeps running against the schema
            # the next one migrated, through a rolling update or a rollback (docs/ledger.md,
            # "Schema and backends"); what that migration changed may still fail its writes.
            logger.warning(
                "ledger %s records schema migration %04d, newer than this release knows "
                "(%04d): a newer release migrated it, and what that migration changed may fail "
                "this release's writes",
                self.where,
                newest,
                highest,
            )

    def _closed(self) -> DependencyUnavailable:
        """What a call on this ledger after :meth:`close` raises: retryable, as a stage that is
        shutting down refuses its work (only its service's end closes it; a redelivery reaches
        a replica whose ledger is open)."""
        return DependencyUnavailable(f"ledger {self.where} is closed: it answers no more calls")

    def _unreadable(self, what: str, exc: _UnreadableRow) -> InternalError:
        """A record ``what`` names cannot be read: its columns said, never their values."""
        return InternalError(
            f"ledger {self.where} has an unreadable record ({what}: {exc})",
            errors=[{"field": "ledger", "message": f"{what} cannot be read"}],
        )

    def _now(self) -> datetime:
        return datetime.now(UTC)

    def _lease_clock(self) -> datetime:
        """The time claims and their leases are reckoned in: one clock for every replica."""
        return self._now()  # one host's file: its clock is every connection's

    # -- recording ------------------------------------------------------------------------

    def ingest(self, event: LedgerEvent, *, deadline: float | None = None) -> IngestResult:
        """Record ``event`` once (by source + id) and fold it into its generation's row.

        ``deadline``: the :func:`time.monotonic` by which a lock not granted is answered as such
        (:meth:`_writing`), however long the call waited to run (see :class:`~.store.Ledger`).
        """
        now = self._now()
        change = fold(event, now=now)
        gid = change.generation_id if change else None
        recorded = {
            "source": event.source,
            "id": event.id,
            "type": event.type,
            "subject": event.subject,
            "generation_id": gid,
            "time": change.at if change else utc(event.time or now),
            "time_attribute": utc(event.time) if event.time else None,
            "recorded_at": now,
            "data": event.data,
            "received": as_received(event.data),
        }
        if change is None:
            with self._writing(deadline) as db:
                fresh = bool(db.query(INSERT_EVENT, recorded))
            return IngestResult(generation_id=gid, duplicate=not fresh)
        fresh, row = self._record(recorded, change, now, deadline)
        status = row["status"] if fresh and row else None
        return IngestResult(generation_id=gid, duplicate=not fresh, status=status)

    def _record(
        self, recorded: dict[str, Any], change: Change, now: datetime, deadline: float | None
    ) -> tuple[bool, dict[str, Any] | None]:
        """Insert the event and fold it in, in one transaction; (new?, the generation's row)."""
        with self._writing(deadline) as db:
            fresh = bool(db.query(INSERT_EVENT, recorded))
            if fresh:
                row: dict[str, Any] | None = db.query(
                    UPSERT_GENERATION,
                    upsert_params(change, now, event=(recorded["source"], recorded["id"])),
                )[0]
            else:
                row = self._row(db, change.generation_id)
            self._enqueue_webhooks(db, row, now)
        return fresh, row

    def _writing(self, deadline: float | None) -> AbstractContextManager[Cursor]:
        """The transaction an event is recorded in; ``deadline`` (a :func:`time.monotonic`), if
        any, is when a lock the write waits for is answered as not granted. Here, as PostgreSQL
        has it, a transaction: its waits are bounded by the server's own limits
        (``lock_timeout``, ``statement_timeout``)."""
        return self.transaction()

    @staticmethod
    def _row(db: Cursor, generation_id: str) -> dict[str, Any] | None:
        found = db.query(
            "SELECT * FROM generations WHERE generation_id = :gid", {"gid": generation_id}
        )
        return found[0] if found else None

    def _enqueue_webhooks(self, db: Cursor, row: dict[str, Any] | None, now: datetime) -> None:
        """Write the notifications ``row`` makes due; idempotent (a message id per event).

        Also run for a redelivered event: if recording it the first time was cut short
        before its notifications were written, the redelivery writes them.
        """
        if not row or not row.get("webhook"):
            return
        # The failure a later success made good is no error of the generation sent, as the
        # status and the history say (fold.made_good): derive's, by the derivatives recorded.
        derived = bool(
            row.get("failed_stage")
            and db.query(PERSISTED_RECORDED, {"gid": row["generation_id"], "type": IMAGE_DERIVED})
        )
        generation = _generation(row, derived=derived)
        due = due_webhooks(row["status"], row.get("webhook_events"))
        if row["status"] == "persisted":
            # A stored image outranks a failure report: a failed message not yet sent is not
            # sent. And "completed" waits for image.persisted itself, which may come after
            # image.derived: the generation it sends then has its keys, URLs and checksum.
            gid = generation.generation_id
            db.run(CANCEL_FAILED, {"gid": gid, "now": now})
            if "completed" in due and not db.query(
                PERSISTED_RECORDED, {"gid": gid, "type": IMAGE_PERSISTED}
            ):
                due.remove("completed")
        for kind in due:
            payload = WebhookMessage(
                type=f"generation.{kind}", timestamp=now, data=generation
            ).model_dump(mode="json")
            db.run(
                INSERT_DELIVERY,
                {
                    "msg_id": message_id(generation.generation_id, kind),
                    "generation_id": generation.generation_id,
                    "event": kind,
                    "url": row["webhook"],
                    "receiver": _receiver(row["webhook"]),
                    "payload": json.dumps(payload, separators=(",", ":")),
                    "now": now,
                },
            )

    # -- queries --------------------------------------------------------------------------

    def get(self, generation_id: str) -> GenerationDetail | None:
        """The generation with its timeline and stage durations; None when unknown."""
        with self.statement() as db:
            row = self._row(db, generation_id)
            if row is None:
                return None
            events = db.query(
                "SELECT type, source, id, time, recorded_at, seq FROM ledger_events "
                "WHERE generation_id = :gid ORDER BY seq",
                {"gid": generation_id},
            )
        what = f"generation {generation_id}"
        try:
            for event in events:
                what = f"event {event['source']} {event['id']}"
                _checked({k: event[k] for k in _TIMELINE_COLUMNS})
            what = f"generation {generation_id}"
            derived = any(event["type"] == IMAGE_DERIVED for event in events)
            generation = _generation(row, derived=derived)
            timeline: list[TimelineEntry] = []
            previous: datetime | None = None
            for event in _in_time_order(events):
                at = event["time"]
                since = (at - previous).total_seconds() if previous is not None else None
                entry = {k: event[k] for k in _TIMELINE_COLUMNS}
                timeline.append(_model(TimelineEntry, {**entry, "seconds_since_previous": since}))
                previous = at
        except _UnreadableRow as exc:
            raise self._unreadable(what, exc) from None
        return GenerationDetail(
            **generation.model_dump(), timeline=timeline, durations=_durations(generation)
        )

    def history(
        self,
        *,
        status: Status | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> GenerationPage:
        """Generations first seen in ``[since, until)``, newest first, ``limit`` a page.

        Ordered by ``listed_at`` (the first recorded event's time, never moved; ``created_at``
        where a replica older than it left none), not by ``created_at``, which a late earlier
        event moves back: a generation listed on one page is on no other. A generation whose
        row cannot be read is left out of the items, logged and named in the page's
        :attr:`~.models.GenerationPage.unreadable`.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(
                f"limit must be between 1 and {MAX_PAGE}",
                errors=[{"field": "limit", "message": f"must be between 1 and {MAX_PAGE}"}],
            )
        where: list[str] = ["1 = 1"]
        params: dict[str, Any] = {"limit": limit + 1}
        if status is not None:
            where.append("status = :status")
            params["status"] = status
        if model is not None:
            where.append("model = :model")
            params["model"] = model
        if since is not None:
            where.append("created_at >= :since")
            params["since"] = utc(since)
        if until is not None:
            where.append("created_at < :until")
            params["until"] = utc(until)
        if cursor is not None:
            where.append(AFTER)
            params["after_at"], params["after_id"] = decode_cursor(cursor)
        with self.statement() as db:
            rows = db.query(HISTORY_PAGE.format(where=" AND ".join(where)), params)
        more = len(rows) > limit
        last = rows[limit - 1] if more else None
        if last is not None and isinstance(last["listed_key"], Unreadable):
            # The next page starts after this row's position, which cannot be read.
            what = f"generation {last['generation_id']}"
            raise self._unreadable(what, _UnreadableRow(["listed_at"]))
        items, unreadable = [], []
        for row in rows[:limit]:
            try:
                items.append(_generation(row, derived=bool(row["derived"])))
            except _UnreadableRow as exc:
                unreadable.append(row["generation_id"])
                logger.warning("%s", self._unreadable(f"generation {row['generation_id']}", exc))
        page = GenerationPage(
            items=items,
            next_cursor=encode_cursor(last["listed_key"], last["generation_id"]) if last else None,
        )
        page._unreadable = unreadable
        return page

    def events(self, *, since: datetime | None = None) -> Iterator[LedgerEvent]:
        """Every recorded event in the order recorded; ``since``: recorded at or after it.

        Raises:
            InternalError: an event's row cannot be read (named).
        """
        for row in self._event_rows(since):
            yield self._event(row)

    def _event(self, row: dict[str, Any]) -> LedgerEvent:
        fields = {k: v for k, v in row.items() if k != "seq"}
        try:
            if fields.get("received") is not None:  # text, JSON's: not a JSON column's value
                try:
                    fields["received"] = json.loads(fields["received"])
                except ValueError:
                    raise _UnreadableRow(["received"]) from None
            return _model(LedgerEvent, fields)
        except _UnreadableRow as exc:
            raise self._unreadable(f"event {row['source']} {row['id']}", exc) from None

    def _event_rows(self, since: datetime | None) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            with self.statement() as db:
                rows = db.query(
                    "SELECT * FROM ledger_events WHERE seq > :after AND recorded_at >= :since "
                    "ORDER BY seq LIMIT :batch",
                    {
                        "after": after,
                        "since": utc(since or datetime(1970, 1, 1, tzinfo=UTC)),
                        "batch": _EXPORT_BATCH,
                    },
                )
            yield from rows
            if len(rows) < _EXPORT_BATCH:
                return
            after = rows[-1]["seq"]

    def generation_events(
        self, generation_id: str, *, order: Literal["time", "recorded"] = "time"
    ) -> list[LedgerEvent]:
        """The events recorded for one generation, in time order, or in the order recorded
        (``recorded``: the first is the one the generation's row took its request from)."""
        by = "e.time, e.seq" if order == "time" else f"{_TOOK_REQUEST}, e.seq"
        with self.statement() as db:
            rows = db.query(
                "SELECT e.* FROM ledger_events AS e "  # noqa: S608 - fixed parts
                "LEFT JOIN generations AS g ON g.generation_id = e.generation_id "
                f"WHERE e.generation_id = :gid ORDER BY {by}",
                {"gid": generation_id},
            )
        return [self._event(row) for row in rows]

    def export_jsonl(self, out: TextIO, *, since: datetime | None = None) -> int:
        """Write every event as one structured-mode CloudEvent JSON object a line.

        Each keeps the extension attributes the Triggers route it on (render's, the job's
        model: :func:`imagegen.events.routing_attributes`), derived from its data as the stage
        that sent it derived them, so an exported event sent again reaches the stage it did.

        Raises:
            InternalError: after every readable event is written, when some could not be read
                (the first named, with how many).
        """
        from contextlib import suppress

        from imagegen.events import event_models, routing_attributes

        models = event_models()
        count = 0
        unreadable: list[InternalError] = []
        for row in self._event_rows(since):
            try:
                event = self._event(row)  # time_attribute checked readable with the rest
            except InternalError as exc:  # the others are still written
                unreadable.append(exc)
                continue
            # The time attribute as received (migration 0007), not the stage's time the ledger
            # orders by: absent where the event carried none.
            sent: datetime | None = row.get("time_attribute")
            # The data as it came (migration 0010), as replay sends it: a line sent again is
            # the event its producer sent, refused where that was, never one made valid by the
            # U+FFFD the ledger stores for a NUL or a lone surrogate.
            data = event.data_as_received
            routed: dict[str, str] = {}
            # Read as replay reads a recorded job (JSON's types, not the stage's strictness);
            # data its model refuses is exported as recorded, without: the stage refuses it.
            if (model := models.get(event.type)) is not None:
                with suppress(ValidationError):
                    routed = routing_attributes(model.model_validate(data, strict=False))
            body = {
                "specversion": "1.0",
                "id": event.id,
                "source": event.source,
                "type": event.type,
                **({"subject": event.subject} if event.subject else {}),
                **({"time": sent.isoformat()} if sent else {}),
                **routed,
                "datacontenttype": "application/json",
                "recordedat": event.recorded_at.isoformat() if event.recorded_at else None,
                "data": data,
            }
            # A lone surrogate no UTF-8 holds: such a line in ASCII, the surrogate JSON's \ud800.
            ascii_only = event.received is not None
            out.write(json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only) + "\n")
            count += 1
        if unreadable:
            first, more = unreadable[0], len(unreadable) - 1
            others = f" and {more} more" if more else ""
            raise InternalError(
                f"{first.message}{others}, not exported ({count} events were)",
                errors=first.errors,
            )
        return count

    def prune(self, older_than: timedelta) -> dict[str, int]:
        """Forget generations untouched, and events recorded, more than ``older_than`` ago."""
        before = self._now() - older_than
        with self.transaction() as db:
            self._unbounded(db)
            return {name: db.run(sql, {"before": before}) for name, sql in PRUNE.items()}

    # -- webhook outbox -------------------------------------------------------------------

    @cached_property
    def _claiming(self) -> threading.Lock:
        """Held by each claim of this ledger: claims from one process's threads follow each
        other, each seeing the receivers the one before it took, instead of leaving out the
        rows another holds locked (PostgreSQL) or waiting for the database lock (SQLite)."""
        return threading.Lock()

    def claim_deliveries(self, *, limit: int = 20, lease: float = 60.0) -> list[Delivery]:
        """Take up to ``limit`` due messages, the longest due first; others will not see them
        for ``lease`` seconds.

        At most one message per receiver (:func:`_receiver`), and none for a receiver that a
        message is still being sent to, by any replica sharing the database (its outcome not
        recorded, its lease not over: ``sending_until``, migration 0009): a receiver that does
        not answer holds one sender, and the messages to others are claimed meanwhile. Each
        receiver's messages go one at a time, in the order due; a generation's ``completed`` or
        ``failed`` waits while its ``started`` is pending (not yet delivered, given up or
        cancelled), so a receiver hears of a generation's start before its end.
        """
        with self._claiming:
            return self._claim_deliveries(limit, lease)

    def _claim_deliveries(self, limit: int, lease: float) -> list[Delivery]:
        now = self._lease_clock()
        picked: list[tuple[str, str]] = []  # (msg_id, receiver)
        with self.transaction() as db:
            # SQLite: the transaction holds the database's write lock from its start (BEGIN
            # IMMEDIATE), so the receivers read here stay the ones being sent to until it ends.
            # Reckoned from the URLs, not read from the marks: a mark a replica of an older
            # release wrote may name its receiver otherwise (:func:`_receiver`).
            taken = {
                _receiver(row["url"])
                for row in db.query(
                    "SELECT DISTINCT url FROM webhook_deliveries WHERE sending_until > :now",
                    {"now": now},
                )
            }
            while len(picked) < limit:
                want = limit - len(picked)
                # The receivers taken so far left out by the database, so the due messages of
                # a receiver being sent to are not read, however many wait. A row whose key is
                # none or not this release's (written before migration 0009, or by an older
                # release) is read once, and its key written: each round then leaves out every
                # row read before it, and finds at least one more.
                skip = sorted(taken)
                params: dict[str, Any] = {"now": now, "limit": want}
                params.update({f"r{n}": key for n, key in enumerate(skip)})
                left_out = ", ".join(f":r{n}" for n in range(len(skip)))
                rows = db.query(
                    "SELECT msg_id, url, receiver FROM webhook_deliveries "  # noqa: S608
                    f"WHERE state = 'pending' AND next_attempt_at <= :now AND {_NOT_BEFORE_START}"
                    + (f" AND (receiver IS NULL OR receiver NOT IN ({left_out}))" if skip else "")
                    + f" ORDER BY next_attempt_at, msg_id LIMIT :limit{self.skip_locked}",
                    params,
                )
                for row in rows:
                    to = _receiver(row["url"])
                    if row["receiver"] != to:
                        db.run(
                            "UPDATE webhook_deliveries SET receiver = :receiver "
                            "WHERE msg_id = :msg_id",
                            {"msg_id": row["msg_id"], "receiver": to},
                        )
                    if to in taken or len(picked) == limit:
                        continue
                    taken.add(to)  # taken by this claim, or by another: left out either way
                    if self._hold_receiver(db, to, now):
                        picked.append((row["msg_id"], to))
                if len(rows) < want:
                    break
            claimed = []
            for msg_id, to in picked:
                # next_attempt_at and sending_until both at the lease's end: the message is not
                # due before it (what a replica older than 0009 claims by, and the backlog
                # counts), and its receiver is being sent to until then, or until the outcome.
                claimed += db.query(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, "
                    "next_attempt_at = :lease_until, sending_until = :lease_until, "
                    "receiver = :receiver WHERE msg_id = :msg_id "
                    "RETURNING msg_id, generation_id, event, url, payload, attempts, created_at",
                    {
                        "msg_id": msg_id,
                        "receiver": to,
                        "lease_until": now + timedelta(seconds=lease),
                    },
                )
        return [Delivery(**row) for row in claimed]

    def _hold_receiver(self, db: Cursor, receiver: str, now: datetime) -> bool:
        """Whether this claim may send ``receiver`` a message: no other claim is taking one for
        it, and none it took is being sent. Nothing to do on SQLite, whose claims run one at a
        time (BEGIN IMMEDIATE), each after the last committed its marks.

        PostgreSQL runs claims at once, in READ COMMITTED: ``FOR UPDATE SKIP LOCKED`` keeps two
        of them from taking one row, not from taking two rows of one receiver, and the
        receivers read at the start miss a claim that commits after that read. So a claim takes
        a lock on the receiver for the rest of its transaction (``pg_try_advisory_xact_lock``
        on its ``hashtext``, namespaced; not waiting: a receiver another claim holds is left
        out), then reads again whether the receiver is being sent to, in a statement of its
        own, whose snapshot is taken after the lock was granted: a claim that held the lock
        before released it at its end, after its commit became visible, so its mark is seen.
        Two receivers of one hash only leave each other out of a claim, never send at once.
        """
        if self.dialect != "postgres":
            return True
        [held] = db.query(
            "SELECT pg_try_advisory_xact_lock(CAST(:space AS INTEGER), hashtext(:receiver)) "
            "AS held",
            {"space": _RECEIVER_LOCKS, "receiver": receiver},
        )
        if not held["held"]:
            return False
        return not db.query(
            "SELECT 1 AS found FROM webhook_deliveries "
            "WHERE receiver = :receiver AND sending_until > :now LIMIT 1",
            {"receiver": receiver, "now": now},
        )

    def release_deliveries(self, claimed: list[Delivery]) -> int:
        """Give back messages this ledger's :meth:`claim_deliveries` returned and that were not
        sent (their sender stopping): due now, their attempts as before the claim, their
        receivers free. Only while each is still on that claim; returns how many were."""
        if not claimed:
            return 0
        now = self._lease_clock()
        released = 0
        with self.transaction() as db:
            for delivery in claimed:
                released += db.run(
                    "UPDATE webhook_deliveries SET attempts = attempts - 1, "
                    "next_attempt_at = :now, sending_until = NULL "
                    "WHERE msg_id = :msg_id AND state = 'pending' AND attempts = :attempts",
                    {"msg_id": delivery.msg_id, "attempts": delivery.attempts, "now": now},
                )
        return released

    def finish_delivery(
        self,
        msg_id: str,
        *,
        delivered: bool,
        error: str | None = None,
        retry_in: float | None,
        attempts: int | None = None,
    ) -> bool:
        """Mark a claimed message delivered, due again in ``retry_in`` s, or (None) given up.

        ``attempts`` (the claim's, as :meth:`claim_deliveries` returned it): only while the
        message is still pending on that claim, so an attempt that outlived its lease cannot
        overwrite the outcome of the claim after it. Returns whether the outcome was recorded.

        A delivery is recorded too where the message was cancelled while this claim was
        sending it (the image persisted meanwhile, :data:`~._statements.CANCEL_FAILED`): the
        receiver has it, and only a message not yet sent is cancelled. A failed send leaves it
        cancelled.
        """
        return self._finish_delivery(msg_id, delivered, error, retry_in, attempts)

    def _finish_delivery(
        self,
        msg_id: str,
        delivered: bool,
        error: str | None,
        retry_in: float | None,
        attempts: int | None,
    ) -> bool:
        now = self._lease_clock()
        if delivered:
            sql = "state = 'delivered', delivered_at = :now, last_error = NULL"
        elif retry_in is not None:
            sql = "next_attempt_at = :next, last_error = :error"
        else:
            sql = "state = 'failed', last_error = :error"
        states = "('pending', 'cancelled')" if delivered else "('pending')"
        claim = "" if attempts is None else f" AND state IN {states} AND attempts = :attempts"
        params = {
            "msg_id": msg_id,
            "now": now,
            "next": now + timedelta(seconds=retry_in or 0),
            "error": (error or "")[:1000],
            "attempts": attempts,
        }
        # The claim is over, its outcome recorded or not: its receiver may be sent the next
        # message (its mark cleared, migration 0009). Not where a later claim took the message
        # (another attempts): that claim's mark stands.
        mine = "" if attempts is None else " AND attempts = :attempts"
        with self.transaction() as db:
            changed = db.run(
                f"UPDATE webhook_deliveries SET {sql}, sending_until = NULL "  # noqa: S608
                f"WHERE msg_id = :msg_id{claim}",
                params,
            )
            if not changed:  # cancelled meanwhile, and not sent: no outcome, the mark cleared
                db.run(
                    "UPDATE webhook_deliveries SET sending_until = NULL "  # noqa: S608
                    f"WHERE msg_id = :msg_id AND sending_until IS NOT NULL{mine}",
                    params,
                )
        return changed > 0

    def delivery_states(self, generation_id: str) -> dict[str, dict[str, Any]]:
        """Webhook messages of one generation by event: state, attempts, last error."""
        with self.statement() as db:
            rows = db.query(
                "SELECT event, msg_id, state, attempts, last_error FROM webhook_deliveries "
                "WHERE generation_id = :gid",
                {"gid": generation_id},
            )
        return {row.pop("event"): row for row in rows}


# A message a claim may take, as to its generation's other messages: an end (completed, failed)
# not while the start is pending, being sent or due later. By the index on (generation_id, event)
# (migration 0003): one lookup per message read.
_NOT_BEFORE_START = (
    "(event = 'started' OR NOT EXISTS (SELECT 1 FROM webhook_deliveries AS begun "
    "WHERE begun.generation_id = webhook_deliveries.generation_id "
    "AND begun.event = 'started' AND begun.state = 'pending'))"
)

# The namespace of the receivers' advisory locks (the first key of the two-key form), apart from
# the migrations' lock (one bigint key) and other programs' locks on the database: "imgr".
_RECEIVER_LOCKS = 0x696D6772


def _receiver(url: str) -> str:
    """The key of the receiver a webhook message goes to (:func:`~.webhooks.receiver`), by
    which claims find the receivers being sent to (the ``receiver`` column) and lock one
    (PostgreSQL's advisory locks).

    With a ``/`` after it: the key of a URL with no user-info and a host with no trailing dot
    is then the one the release before wrote (the URL up to its path's ``/``), so a replica of
    either, during a rolling update, sees the other's marks and locks. A key that release
    wrote otherwise is mended when a claim reads its row (:meth:`SqlLedger.claim_deliveries`).
    """
    try:
        return receiver(url) + "/"
    except ValueError:  # no URL pydantic wrote: a receiver of its own, refused when sent
        return url


def _checked(row: dict[str, Any]) -> dict[str, Any]:
    """``row``, all of whose values were read.

    Raises:
        _UnreadableRow: a value is :class:`Unreadable`.
    """
    bad = [value.column for value in row.values() if isinstance(value, Unreadable)]
    if bad:
        raise _UnreadableRow(bad)
    return row


def _model(model: type[_M], row: dict[str, Any]) -> _M:
    """``row`` as ``model``.

    Raises:
        _UnreadableRow: a value is unreadable, or not what ``model`` takes (a newer version's
            status, say).
    """
    try:
        return model(**_checked(row))
    except ValidationError as exc:
        raise _UnreadableRow([str(e["loc"][0]) for e in exc.errors() if e["loc"]]) from None


def _generation(row: dict[str, Any], *, derived: bool = False) -> Generation:
    """``row`` as the generation it records; ``derived``: an ``image.derived`` is recorded for
    it (a failure of derive then made good: :func:`~.fold.made_good`)."""
    fields = {name: row[name] for name in Generation.model_fields if name in row}
    for name in ("keys", "urls"):
        fields[name] = fields.get(name) or {}
    if made_good(str(row["status"]), row.get("failed_stage"), derived=derived):
        # The failure is the timeline's, an earlier event: not an error of the generation.
        fields.update(failed_at=None, failed_stage=None, error=None)
    return _model(Generation, fields)


_IN_CHAIN = {kind: n for n, kind in enumerate(CHAIN_ORDER)}
_TIMELINE_COLUMNS = ("type", "source", "id", "time")


def _in_time_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A generation's events (read, in the order recorded) as its timeline lists them: by
    time, events of one time in the chain's order (``image.derived`` carries its image's
    persisted_at, as ``image.persisted`` does), then in the order recorded.

    An ``image.derived`` recorded after a failure later than its time is a later try of derive
    that succeeded (its data carries no time of its own, and a failure is timed when it is
    first recorded): it is placed when it was recorded, after that failure, not back at the
    image's time, before the failure it made good.
    """
    placed = []
    failed: datetime | None = None  # the latest failure recorded so far
    for event in events:
        at: datetime = event["time"]
        if event["type"] == GENERATION_FAILED:
            failed = at if failed is None else max(failed, at)
        elif event["type"] == IMAGE_DERIVED and failed is not None and failed > at:
            recorded = event["recorded_at"]  # unreadable: the failure's time, at least
            at = max(failed, recorded) if isinstance(recorded, datetime) else failed
        placed.append({**event, "time": at})
    return sorted(
        placed,
        key=lambda e: (e["time"], _IN_CHAIN.get(e["type"], len(CHAIN_ORDER)), e["seq"]),
    )


def _durations(g: Generation) -> dict[str, float]:
    spans = {
        "enhance": (g.requested_at, g.enhanced_at),
        "render": (g.enhanced_at, g.rendered_at),
        "persist": (g.rendered_at, g.persisted_at),
        "total": (g.requested_at or g.created_at, g.persisted_at or g.failed_at),
    }
    return {
        name: (end - start).total_seconds()
        for name, (start, end) in spans.items()
        if start is not None and end is not None
    }
