"""The embedded ledger: one SQLite file, standard library only (a laptop's default).

Writers take the database lock at ``BEGIN IMMEDIATE`` and wait for it (busy timeout), so
several ``imagegen`` processes can record into one file. Reads take no lock a writer holds: each
runs in a deferred transaction, which in WAL mode reads the last commit while another process
writes (SQLite's "Write-Ahead Logging", "Concurrency").
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InternalError,
    NotFound,
    first_line,
)
from imagegen.ledger._sql import (
    BUSY,
    BUSY_RETRY_AFTER,
    JSON_COLUMNS,
    TIME_COLUMNS,
    SqlLedger,
    Unreadable,
)
from imagegen.ledger._text import storable

__all__ = ["SqliteLedger"]

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_S = 30.0


def _time_text(value: datetime) -> str:
    """One fixed-width UTC form, so text order is time order."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # isoformat, unlike strftime's %Y, writes every year in four digits (0999, not 999).
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _adapt(value: Any) -> Any:
    """``value`` as a parameter: text as :func:`~._text.storable` makes it (PostgreSQL alike)."""
    if isinstance(value, datetime):
        return _time_text(value)
    if isinstance(value, dict | list):
        return json.dumps(storable(value), separators=(",", ":"))
    return storable(value)


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if name in TIME_COLUMNS:
            return datetime.fromisoformat(value)
        if name in JSON_COLUMNS:
            return json.loads(value)
    except (TypeError, ValueError):  # not as written here: by hand, another program
        return Unreadable(name)
    return value


_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
"""What SQLite says of a file whose pages are damaged (found only when they are read)."""
_BUSY = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
"""What SQLite says of a lock another connection held past the busy timeout (primary codes:
an extended code, ``SQLITE_BUSY_SNAPSHOT`` say, is matched by its prefix)."""


class _Cursor:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        cur = self._conn.execute(sql, {k: _adapt(v) for k, v in params.items()})
        names = [d[0] for d in cur.description or ()]
        return [
            {name: _convert(name, value) for name, value in zip(names, row, strict=True)}
            for row in cur.fetchall()
        ]

    def run(self, sql: str, params: dict[str, Any]) -> int:
        cur = self._conn.execute(sql, {k: _adapt(v) for k, v in params.items()})
        return cur.rowcount


def _write_ahead(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode, waiting out another connection doing the same.

    Two processes opening a new ledger at once (two pods, a CLI beside a function) both ask for
    WAL; SQLite answers the second ``SQLITE_BUSY`` at once, without its busy handler (the
    switch needs an exclusive lock, and waiting for one there could deadlock), so it is retried
    here within the same busy timeout.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


class SqliteLedger(SqlLedger):
    """The ledger in a SQLite file (created, with its folder, when missing unless
    ``must_exist``).

    Args:
        path: The database file; ``:memory:`` for a private in-memory ledger.
        must_exist: the file is opened only if it is there: neither it nor its folder is made.

    Raises:
        NotFound: ``must_exist``, and the file is not there.
        ConfigurationError: ``path`` cannot hold a ledger (a folder, a file that is no SQLite
            database, a file where a folder of its path should be).
        DependencyUnavailable: the file cannot be opened or migrated now (permissions, a full
            disk, a lock held past the busy timeout).
    """

    dialect = "sqlite"
    migrations_table = (
        "SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = 'ledger_migrations'"
    )

    def __init__(self, path: str | Path, *, must_exist: bool = False) -> None:
        if str(path) != ":memory:":
            path = Path(path).expanduser()
        self.path = path
        self._must_exist = must_exist
        self.where = str(path)
        self._lock = threading.RLock()
        try:
            self._open()
        except (FileExistsError, NotADirectoryError):
            raise self._unusable("has a file where a folder of its path should be") from None
        except sqlite3.OperationalError as exc:
            raise DependencyUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        except DependencyUnavailable as exc:  # its lock held past the busy timeout
            raise DependencyUnavailable(
                f"ledger {self.path} cannot be opened: {exc.message}", retry_after=exc.retry_after
            ) from None
        except sqlite3.DatabaseError:  # "file is not a database", "disk image is malformed"
            raise self._unusable("is not a SQLite database") from None
        except (sqlite3.Error, OSError) as exc:
            raise DependencyUnavailable(
                f"ledger {self.path} cannot be opened: {first_line(exc)}"
            ) from None

    def _open(self) -> None:
        path = self.path
        target: str | Path = path
        if isinstance(path, Path):
            if path.is_dir():
                raise self._unusable("is a folder, not a file")
            if self._must_exist:
                try:
                    path.stat()  # a file where a folder should be: NotADirectoryError
                except FileNotFoundError:
                    raise NotFound(f"ledger {path} does not exist") from None
                # Read-write, never create: gone since, it is an error, not a new ledger.
                target = f"{path.absolute().as_uri()}?mode=rw"
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by this process's threads, one statement at a time (the lock);
        # transactions are explicit, so autocommit mode (isolation_level=None).
        self._conn = sqlite3.connect(
            target,
            timeout=_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            uri=target is not path,
        )
        try:
            if isinstance(path, Path):
                _write_ahead(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    def _unusable(self, why: str) -> ConfigurationError:
        """The ledger's path is wrong: the setting (or ``--ledger``) must change."""
        return ConfigurationError(
            f"ledger {self.path} {why}",
            errors=[{"field": "ledger_url", "message": why}],
        )

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._within("BEGIN IMMEDIATE") as cursor:
            yield cursor

    @contextmanager
    def statement(self) -> Iterator[_Cursor]:
        """A read: a deferred transaction, one snapshot for its statements, which takes no lock
        a writer waits for or holds (WAL mode; a ``:memory:`` ledger has one connection)."""
        with self._within("BEGIN DEFERRED") as cursor:
            yield cursor

    @contextmanager
    def _within(self, begin: str) -> Iterator[_Cursor]:
        with self._lock, self._errors():
            self._conn.execute(begin)
            try:
                yield _Cursor(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A damaged file, found by a statement after it opened, said in one line; a lock held
        past the busy timeout, retryable, as PostgreSQL's lock conflicts are answered."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            name = exc.sqlite_errorname or ""
            if name in _DAMAGED:
                raise InternalError(f"ledger {self.path} is unreadable: {exc}") from None
            if "_".join(name.split("_")[:2]) in _BUSY:
                logger.warning("ledger %s: %s (%s)", self.path, exc, name)
                raise DependencyUnavailable(BUSY, retry_after=BUSY_RETRY_AFTER) from None
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"
