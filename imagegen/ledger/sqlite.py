"""The embedded ledger: one SQLite file, standard library only (a laptop's default).

Writers take the database lock at ``BEGIN IMMEDIATE`` and wait for it (busy timeout), so
several ``imagegen`` processes can record into one file; WAL keeps readers off writers' backs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagegen.ledger._sql import JSON_COLUMNS, TIME_COLUMNS, SqlLedger

__all__ = ["SqliteLedger"]

_BUSY_TIMEOUT_S = 30.0


def _time_text(value: datetime) -> str:
    """One fixed-width UTC form, so text order is time order."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # isoformat, unlike strftime's %Y, writes every year in four digits (0999, not 999).
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _adapt(value: Any) -> Any:
    if isinstance(value, datetime):
        return _time_text(value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in TIME_COLUMNS:
        return datetime.fromisoformat(value)
    if name in JSON_COLUMNS:
        return json.loads(value)
    return value


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


class SqliteLedger(SqlLedger):
    """The ledger in a SQLite file (created, with its folder, when missing).

    Args:
        path: The database file; ``:memory:`` for a private in-memory ledger.
    """

    dialect = "sqlite"

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            path = Path(path).expanduser()
        self.path = path
        self._lock = threading.RLock()
        # One connection shared by this process's threads, one statement at a time (the lock);
        # transactions are explicit, so autocommit mode (isolation_level=None).
        self._conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        if str(path) != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _Cursor(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"
