"""The ledger in PostgreSQL (deployments): psycopg 3 and a connection pool.

Needs the ``ledger`` extra (``pip install 'imagegen[ledger]'``): imported only when a
``postgresql://`` ledger is opened.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import unquote

from imagegen._pgurl import split_postgres_url
from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InvalidRequest,
    first_line,
)
from imagegen.ledger._sql import BUSY, BUSY_RETRY_AFTER, Cursor, SqlLedger
from imagegen.ledger._statements import RECORD, upsert_params
from imagegen.ledger._text import storable
from imagegen.ledger.fold import Change

__all__ = ["PostgresLedger"]

logger = logging.getLogger(__name__)

_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")
# Any constant: replicas starting together queue on it, so each migration runs once.
_MIGRATION_LOCK = 0x1ED6E5
# While the server is unreachable: how long a request waits for a connection (each wait has
# the pool try one), the pool's own retries before it leaves the next try to the next request,
# and how long one try may take (libpq's default is 130 s: a server behind a dropped route).
DOWN_WAIT = 1.0
RECONNECT_FOR = 2.0
CONNECT_TIMEOUT = 5
# A server that stops answering on a connection it accepted (a network partition, a dropped
# route) is given up on by the client's own socket, not only by the server's limits below,
# which a server that is gone never applies: without these a statement waits on the socket
# for as long as the kernel keeps the connection (libpq's defaults leave keepalives to the
# system's two hours), holding its thread and pooled connection. Each is a libpq connection
# parameter (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS),
# defaulted unless the URL sets it, as connect_timeout is:
#   keepalives=1: TCP keepalives on (libpq's default too; said so that the others apply).
#   keepalives_idle: seconds of silence before the first keepalive probe (TCP_KEEPIDLE).
#   keepalives_interval: seconds between unanswered probes (TCP_KEEPINTVL).
#   keepalives_count: probes unanswered before the connection is dropped (TCP_KEEPCNT).
#   tcp_user_timeout: milliseconds that sent data may go unacknowledged before the connection
#     is dropped (TCP_USER_TIMEOUT, Linux), which also bounds the keepalives above.
# An idle pooled connection to a gone peer is dropped after about 10 + 3 * 5 = 25 s; a statement
# whose bytes are not acknowledged fails after 20 s, within the function's 30 s and well
# within the ledger Service's 60 s grace. A peer whose kernel still acknowledges (a server
# process hung, its host up) is not seen by TCP: the function's timeout answers the request,
# and the call is left on its daemon thread (imagegen.ledger.api.blocking).
SOCKET_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}
# How long a statement may wait for a lock, and run in all, before the server cancels it
# (lock_timeout, statement_timeout; seconds). Without them a lock held elsewhere (a manual
# LOCK TABLE, a long migration) keeps each event waiting past the stage's 30 s, its statement
# running on after the answer, holding a worker thread and a pooled connection until the
# default thread pool is full and every request waits. The ledger's own transactions hold a
# row for milliseconds, and its statements are single-row writes and index-bounded reads
# (a page of history, an export batch): waits and runs of seconds are something else holding
# on. The lock timeout is above PostgreSQL's deadlock_timeout (1 s), so a deadlock is still
# detected and ended as one; both end a request's statements well within the 30 s.
LOCK_TIMEOUT = 2.0
STATEMENT_TIMEOUT = 5.0
# Each new pooled connection's limits: the ledger's, unless this connection's URL options
# (or PGOPTIONS: source "client") or ALTER ROLE/DATABASE ... SET set their own (the operator's
# choice for this application), which are kept. A server-wide default (postgresql.conf) is
# not about the ledger. SET, not startup options: a pooler in between (PgBouncer) refuses
# startup options it does not know, and a URL that works must keep working.
_LIMITS = (
    "SELECT set_config(name, CASE name WHEN 'lock_timeout' THEN %(lock)s "
    "ELSE %(statement)s END, false) FROM pg_settings "
    "WHERE name IN ('lock_timeout', 'statement_timeout') "
    "AND source NOT IN ('client', 'user', 'database', 'database user')"
)
# A statement the server cancelled at its statement_timeout (or an operator's cancel).
QUERY_CANCELED = "57014"
# A generation's row, locked until the transaction ends: its webhook messages are written from it.
_NO_DRIVER = "a PostgreSQL ledger needs psycopg: pip install 'imagegen[ledger]'"
LOCK_ROW = "SELECT * FROM generations WHERE generation_id = :gid FOR UPDATE"


# libpq's refusals of a URL (fe-connect.c: conninfo_uri_parse_options, _parse_params and
# conninfo_uri_decode), each matched at the start of libpq's message and said in words of its
# own: libpq's go on to quote the part it cannot read, often a password, which may itself hold
# the words of another refusal. A bare '%' (in a password) is told how it is written.
_UNKNOWN_PARAMETER = re.compile(r'invalid URI query parameter: "(.*)"\Z', re.DOTALL)
_PERCENT = "; a '%' in it is written %25"
_UNREADABLE = (
    ('missing key/value separator "=" in URI query', "a query parameter without '=' (?name=value)"),
    ('extra key/value separator "=" in URI query', "a query parameter with a second '='"),
    ("invalid percent-encoded token: ", f"a '%' not followed by two hex digits{_PERCENT}"),
    ("forbidden value %00 in percent-encoded value: ", f"%00 in it, which libpq refuses{_PERCENT}"),
    ("unexpected spaces found in ", "a space within one of its parts (a space is written %20)"),
    ('end of string reached when looking for matching "]"', "its IPv6 host has no closing ']'"),
    ("IPv6 host address may not be empty", "its IPv6 host is empty"),
    ("unexpected character ", "no ':' or '/' after its IPv6 host's ']'"),
)
# A parameter's name said only where it is one: a word of the length of libpq's own names.
_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")


def _query_names(url: str) -> set[str]:
    """The names of the query parameters of ``url``, decoded, split as libpq splits it
    (:func:`imagegen._pgurl.split_postgres_url`): the credentials end at the first ``@``
    before any ``/`` (a password may hold ``?``), the hosts at the first ``/`` or ``?`` past
    them, and the query follows the first ``?`` after the hosts (a ``[`` in the database name
    is the name's); none where libpq refuses the hosts."""
    parts = split_postgres_url(url)
    if url.partition("://")[2].count("@") > (parts.credentials is not None):
        # An @ past the credentials libpq read: a password with a bare / (or ?, #) before it,
        # which libpq ends the credentials at, reading the rest of the password as a path and
        # a query. No name is taken from such a query: it may be the password's.
        return set()
    if parts.problem or parts.query is None:
        return set()
    return {unquote(pair.partition("=")[0]).strip(" ") for pair in parts.query.split("&")}


def _unreadable(message: str, url: str) -> str:
    """What libpq's ``message`` says is wrong with ``url``, without what stood there: no text
    of libpq's message but the name of an unknown parameter that ``url``'s query names."""
    message = message.strip()
    if unknown := _UNKNOWN_PARAMETER.match(message):
        name = unknown.group(1)
        if _NAME.fullmatch(name) and name in _query_names(url):
            return f"unknown connection parameter {name!r}"
        return "an unknown connection parameter"
    return next(
        (said for start, said in _UNREADABLE if message.startswith(start)), "libpq cannot read it"
    )


def read_url(url: str) -> dict[str, Any]:
    """The connection parameters ``url`` gives, as libpq reads them.

    Raises:
        ConfigurationError: libpq cannot read it, saying why (:func:`_unreadable`). Its own
            message is not passed on: it quotes the part it cannot read, often a password
            (one with a bare ``%``).
    """
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise DependencyUnavailable(_NO_DRIVER) from exc
    try:
        return psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        why = f"is no PostgreSQL connection URL ({_unreadable(str(exc), url)})"
        raise ConfigurationError(
            f"the ledger URL {why}", errors=[{"field": "ledger_url", "message": why}]
        ) from None


@cache
def _pg(sql: str) -> str:
    """``:name`` parameters as psycopg's ``%(name)s`` (statements are a fixed set: cached)."""
    return _PARAM.sub(r"%(\1)s", sql)


def _in_utc(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its times in UTC, as SQLite's are.

    psycopg returns a ``timestamptz`` in the session's TimeZone, which is the server's default
    (``postgresql.conf``) or whatever the URL's ``options`` set: the API, webhooks and exports
    would otherwise say the same instant as ``+02:00`` on one server and ``Z`` on another.
    Converted here, not by a ``TimeZone`` startup option, which a pooler in between
    (PgBouncer) may refuse or drop.
    """
    return {k: v.astimezone(UTC) if isinstance(v, datetime) else v for k, v in row.items()}


class _Cursor:
    def __init__(self, cur: Any, jsonb: Any) -> None:
        self._cur = cur
        self._jsonb = jsonb

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            k: self._jsonb(storable(v)) if isinstance(v, dict | list) else storable(v)
            for k, v in params.items()
        }

    def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        self._cur.execute(_pg(sql), self._params(params))
        return [_in_utc(row) for row in self._cur.fetchall()]

    def run(self, sql: str, params: dict[str, Any]) -> int:
        self._cur.execute(_pg(sql), self._params(params))
        return int(self._cur.rowcount)


class PostgresLedger(SqlLedger):
    """The ledger in a PostgreSQL database; migrations are applied on open.

    Args:
        url: A libpq connection URL (``postgresql://user:password@host:5432/db``).
        min_size: Connections kept open.
        max_size: Connections at most (one per concurrent request is plenty).
        timeout: Seconds to wait for a connection before a retryable error, while the
            server answers (the pool busy); while the last try to connect failed,
            :data:`DOWN_WAIT`.
        lock_timeout: Seconds a statement waits for a lock (:data:`LOCK_TIMEOUT`).
        statement_timeout: Seconds a statement may run (:data:`STATEMENT_TIMEOUT`).

    Each limit is the server's ``lock_timeout`` or ``statement_timeout`` on every pooled
    connection, unless the URL's options set it (:data:`_LIMITS`). Migrations and
    :meth:`prune` run without either.

    A server that goes away costs each request a second, not ``timeout``, and one that comes
    back is used by the next request: psycopg_pool alone retries a lost connection with a
    backoff that doubles up to five minutes, so a server back after a minute's outage waited
    another minute for its pool, every request in between waiting ``timeout`` for nothing.
    Here the pool's retries stop after :data:`RECONNECT_FOR` seconds and each request that
    must wait has it try once more.
    """

    dialect = "postgres"
    # Replicas claiming webhook messages at once each take different ones.
    skip_locked = " FOR UPDATE SKIP LOCKED"
    # In the search_path, as every statement's tables are.
    migrations_table = "SELECT 1 AS found WHERE to_regclass('ledger_migrations') IS NOT NULL"

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout: float = 10.0,
        lock_timeout: float = LOCK_TIMEOUT,
        statement_timeout: float = STATEMENT_TIMEOUT,
    ) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg.types.json import Jsonb
            from psycopg_pool import ConnectionPool, PoolClosed
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise DependencyUnavailable(_NO_DRIVER) from exc
        self._errors = (psycopg.OperationalError, psycopg.errors.ConnectionTimeout)
        # The pool closed (close()): an OperationalError too, so caught before self._errors.
        self._pool_closed = PoolClosed
        # Refusals of a value, which a retry would meet again: not the database unavailable.
        # ProgramLimitExceeded (SQLSTATE class 54) is an OperationalError in psycopg, so it is
        # caught before self._errors.
        self._refusals = (psycopg.errors.ProgramLimitExceeded, psycopg.DataError)
        self._jsonb = Jsonb
        self._timeout = timeout
        # Monotonic times of the pool's last connection made and last one that failed.
        self._connected = self._refused = 0.0
        # Why the last try to connect failed: what an opening that gets no connection says.
        self._connect_error: BaseException | None = None
        limits = {"lock": _ms(lock_timeout), "statement": _ms(statement_timeout)}
        ledger = self

        class _Connection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    conn = super().connect(*args, **kwargs)
                except BaseException as exc:
                    ledger._refused = time.monotonic()
                    ledger._connect_error = exc
                    raise
                ledger._connected = time.monotonic()
                return conn

        def configure(conn: Any) -> None:
            conn.execute(_LIMITS, limits)

        # transaction() opens a block explicitly; a lone statement needs no BEGIN/COMMIT.
        kwargs: dict[str, Any] = {"row_factory": dict_row, "autocommit": True}
        given = read_url(url)
        # A parameter the URL sets is its own: psycopg's keyword arguments would override it.
        defaults = {"connect_timeout": CONNECT_TIMEOUT, **SOCKET_DEFAULTS}
        kwargs.update({name: value for name, value in defaults.items() if name not in given})
        self._pool = ConnectionPool(
            url,
            connection_class=_Connection,
            configure=configure,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs=kwargs,
            reconnect_timeout=RECONNECT_FOR,
            open=False,
            name="imagegen-ledger",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except Exception:
            self._pool.close()
            raise self._unconnected(timeout) from None
        self._migrate()

    def _unconnected(self, waited: float) -> DependencyUnavailable:
        """The retryable error for an opening that got no connection in ``waited`` seconds:
        why the last try failed, in general terms (the server's text, which names the host,
        the user or the database, is logged), rather than psycopg_pool's "initialization
        incomplete"."""
        exc = self._connect_error
        if exc is None:  # no try ended: one still waits for the server
            why = f"no connection within {waited:g} s"
        else:
            logger.warning("the ledger database could not be connected to: %s", exc)
            why = _connect_failure(exc)
        return DependencyUnavailable(
            f"the ledger database cannot be connected to: {why}", retry_after=RECONNECT_FOR
        )

    def _lock_migrations(self, db: Cursor) -> None:
        # A migration waits for another replica's (the lock below) and runs as long as it
        # takes (an index built on a large table): none of the requests' limits, for this
        # transaction only. One cut short would be rolled back and tried again at each open.
        db.query(
            "SELECT set_config('lock_timeout', '0', true), "
            "set_config('statement_timeout', '0', true)",
            {},
        )
        db.query("SELECT pg_advisory_xact_lock(:key)", {"key": _MIGRATION_LOCK})

    def _unbounded(self, db: Cursor) -> None:
        # A prune deletes in bulk (a first one, months of history) and answers no request: no
        # statement_timeout, nor lock_timeout, so it waits for the rows it deletes as long as
        # another transaction holds them. Another prune holds them all until it commits: this
        # one waits for it, then deletes what the other left (none), rather than fail at the
        # requests' 2 s. A deadlock is still found and ended by the server (deadlock_timeout).
        db.query(
            "SELECT set_config('lock_timeout', '0', true), "
            "set_config('statement_timeout', '0', true)",
            {},
        )

    def _record(
        self, recorded: dict[str, Any], change: Change, now: datetime, deadline: float | None
    ) -> tuple[bool, dict[str, Any] | None]:
        # ``deadline`` is SQLite's: here a lock is waited for within the server's lock_timeout.
        # One statement in autocommit: one round trip. Webhook messages, rare, follow in a
        # transaction of their own; a crash in between is mended by the redelivery (the
        # delivery was never acknowledged), which writes what the event made due.
        with self.statement() as db:
            [result] = db.query(
                RECORD,
                {
                    **recorded,
                    **upsert_params(change, now, event=(recorded["source"], recorded["id"])),
                },
            )
        fresh = bool(result.pop("fresh"))
        row = result if result["generation_id"] is not None else None
        if not fresh or (row is not None and row.get("webhook")):
            with self.transaction() as db:
                # The row read again, and locked until the messages are written: another
                # replica may have recorded a later event since (image.persisted after this
                # generation.failed), and its upsert now waits for this commit, so its own
                # messages (the failed one cancelled) are written from what this one wrote.
                locked = db.query(LOCK_ROW, {"gid": change.generation_id})
                self._enqueue_webhooks(db, locked[0] if locked else None, now)
        return fresh, row

    def _lease_clock(self) -> datetime:
        """The database server's clock: replicas' own clocks may disagree by more than a lease,
        and one that runs ahead would claim a message another is still sending."""
        with self.statement() as db:
            [row] = db.query("SELECT clock_timestamp() AS now", {})
        now: datetime = row["now"]
        return now

    @contextmanager
    def statement(self) -> Iterator[_Cursor]:
        """A cursor whose every statement commits on its own (the pool is in autocommit)."""
        with self._connection() as conn, conn.cursor() as cur:
            yield _Cursor(cur, self._jsonb)

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield _Cursor(cur, self._jsonb)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        cut = False
        try:
            with self._pool.connection(self._wait()) as conn:
                try:
                    yield conn
                except self._errors:
                    # Cut by the server: taken as down until it answers again. Said by this
                    # connection, now: the pool replaces it in the background, and by the
                    # time the answer is made may have connected again.
                    cut = conn.broken
                    if cut:
                        self._refused = time.monotonic()
                    raise
                if self._refused > self._connected:
                    # A pooled connection answered: the server is up, whether or not the pool
                    # replaced the one that was cut (one cut by a proxy, the others fine).
                    self._connected = time.monotonic()
        except self._pool_closed:
            raise self._closed() from None
        except self._refusals as exc:
            raise self._refused_value(exc) from None
        except self._errors as exc:
            raise self._unavailable(exc, cut=cut) from None

    @staticmethod
    def _refused_value(exc: Exception) -> InvalidRequest:
        """The final error for a value PostgreSQL will not hold: a 400, which no redelivery
        can change. The server's text is logged, not answered: it may quote the value (a
        row of another caller's event, a credential in a URL)."""
        state = getattr(exc, "sqlstate", None)
        logger.warning(
            "the ledger database refused a value (SQLSTATE %s): %s", state, first_line(exc)
        )
        why = "has a value the ledger database refuses"
        return InvalidRequest(
            f"the event {why} (SQLSTATE {state})",
            errors=[{"field": "event", "message": why}],
        )

    def down(self) -> bool:
        """Whether the server is taken as unreachable: the pool's last try to connect failed,
        or a connection was cut, and no connection has been made or used since."""
        return self._refused > self._connected

    def _wait(self) -> float:
        return DOWN_WAIT if self.down() else self._timeout

    def _unavailable(self, exc: Exception, *, cut: bool = False) -> DependencyUnavailable:
        """The retryable error for ``exc``, once the pool's idle connections are checked;
        ``cut``: the server cut the connection that raised it.

        A server that cut this connection (a restart, a failover) cut the others too: each
        would fail the next request that drew it. ``pool.check()`` tries each now (an empty
        query) and replaces the broken ones, so this request's redelivery, and the requests
        after it, find live connections. Not a check on every checkout (the pool's ``check``
        option): that costs a round trip each time, and backs off a second, then two, four...
        between stale connections drawn in a row.

        The server's text is logged with its SQLSTATE, not answered: it spans lines (a
        deadlock's DETAIL names other sessions' processes and rows) and a connection error's
        names the host and user. The answer says what happened in general terms.
        """
        state = getattr(exc, "sqlstate", None)
        logger.warning("the ledger database failed a statement (SQLSTATE %s): %s", state, exc)
        # SQLSTATE class 40 (a deadlock, a serialization failure) and 55P03 (lock_timeout): a
        # write that met another, which a retry resolves. psycopg makes each a subclass of
        # OperationalError of its own, not of TransactionRollback: matched by code.
        if state is not None and (state.startswith("40") or state == "55P03"):
            return DependencyUnavailable(BUSY, retry_after=BUSY_RETRY_AFTER)
        if state == QUERY_CANCELED:
            # statement_timeout: the server was slow, or something held the statement up
            # (several waits for locks, each within lock_timeout); its connection is fine.
            # Retried as a lock not granted in time is.
            return DependencyUnavailable(
                "the ledger database could not answer in time (a statement ran past its "
                f"limit, SQLSTATE {QUERY_CANCELED}); retry",
                retry_after=BUSY_RETRY_AFTER,
            )
        with contextlib.suppress(Exception):  # the server may be down: said by ``exc``
            self._pool.check()
        if cut or self.down():
            return DependencyUnavailable(
                "the ledger database is unavailable: it cannot be reached",
                retry_after=RECONNECT_FOR,
            )
        code = f" (SQLSTATE {state})" if state else ""
        return DependencyUnavailable(
            f"the ledger database is unavailable: it could not answer now{code}"
        )

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return "PostgresLedger(<url hidden>)"


def _ms(seconds: float) -> str:
    """``seconds`` as a server setting in milliseconds (its unit for these limits)."""
    return str(round(seconds * 1000))


# libpq passes on no SQLSTATE for a connection the server refused: its error reaches the
# client as text only (PQerrorMessage), so the usual causes are told by PostgreSQL's own
# messages (src/backend/postmaster/postmaster.c, src/backend/utils/init/postinit.c,
# src/backend/libpq/auth.c) and libpq's, in English (a server or client that translates
# them is said in general terms). Each is answered as its words and SQLSTATE only.
_CONNECT_FAILURES = (
    (
        re.compile(r"too many (clients|connections)|connection slots are reserved"),
        "too many connections",
        "53300",
    ),
    (
        re.compile(r"the database system is (starting|shutting|in recovery|not)"),
        "the server is starting up, shutting down or in recovery",
        "57P03",
    ),
    (re.compile(r"password authentication failed"), "password authentication failed", "28P01"),
    (re.compile(r"authentication failed"), "authentication failed", "28000"),
    (re.compile(r"no pg_hba\.conf entry"), "no pg_hba.conf entry admits it", "28000"),
    (re.compile(r'role ".*" does not exist'), "no such role", "28000"),
    (re.compile(r'database ".*" does not exist'), "no such database", "3D000"),
    (re.compile(r"Connection refused"), "connection refused", None),
    (
        re.compile(r"could not translate host name|Name or service not known"),
        "the host name does not resolve",
        None,
    ),
)


def _connect_failure(exc: BaseException) -> str:
    """Why a try to connect failed, in general terms: its cause's words and SQLSTATE (where
    known) and the error's class, never the error's text (it names the host, the user, the
    database)."""
    import psycopg

    kind = type(exc).__name__
    if isinstance(exc, psycopg.errors.ConnectionTimeout):
        return f"no answer within the connect timeout ({kind})"
    text = str(exc)
    for pattern, words, state in _CONNECT_FAILURES:
        if pattern.search(text):
            return f"{words} ({kind}, SQLSTATE {state})" if state else f"{words} ({kind})"
    return f"it cannot be reached or refused the connection ({kind})"
