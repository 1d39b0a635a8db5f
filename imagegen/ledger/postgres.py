"""The ledger in PostgreSQL (deployments): psycopg 3 and a connection pool.

Needs the ``ledger`` extra (``pip install 'imagegen[ledger]'``): imported only when a
``postgresql://`` ledger is opened.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from imagegen.errors import DependencyUnavailable
from imagegen.ledger._migrate import CREATE_TABLE, migrations, statements
from imagegen.ledger._sql import SqlLedger

__all__ = ["PostgresLedger"]

_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")
# Any constant: replicas starting together queue on it, so each migration runs once.
_MIGRATION_LOCK = 0x1ED6E5


def _pg(sql: str) -> str:
    return _PARAM.sub(r"%(\1)s", sql)


class _Cursor:
    def __init__(self, cur: Any, jsonb: Any) -> None:
        self._cur = cur
        self._jsonb = jsonb

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: self._jsonb(v) if isinstance(v, dict | list) else v for k, v in params.items()}

    def query(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        self._cur.execute(_pg(sql), self._params(params))
        return list(self._cur.fetchall())

    def run(self, sql: str, params: dict[str, Any]) -> int:
        self._cur.execute(_pg(sql), self._params(params))
        return int(self._cur.rowcount)


class PostgresLedger(SqlLedger):
    """The ledger in a PostgreSQL database; migrations are applied on open.

    Args:
        url: A libpq connection URL (``postgresql://user:password@host:5432/db``).
        min_size: Connections kept open.
        max_size: Connections at most (one per concurrent request is plenty).
        timeout: Seconds to wait for a connection before a retryable error.
    """

    dialect = "postgres"
    # Replicas claiming webhook messages at once each take different ones.
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self, url: str, *, min_size: int = 1, max_size: int = 8, timeout: float = 10.0
    ) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg.types.json import Jsonb
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise DependencyUnavailable(
                "a PostgreSQL ledger needs psycopg: pip install 'imagegen[ledger]'"
            ) from exc
        self._errors = (psycopg.OperationalError, psycopg.errors.ConnectionTimeout)
        self._jsonb = Jsonb
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            kwargs={"row_factory": dict_row, "autocommit": False},
            open=False,
            name="imagegen-ledger",
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except Exception as exc:
            self._pool.close()
            raise DependencyUnavailable(f"the ledger database is unreachable: {exc}") from None
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.query("SELECT pg_advisory_xact_lock(:key)", {"key": _MIGRATION_LOCK})
            db.run(CREATE_TABLE, {})
            done = {row["version"] for row in db.query("SELECT version FROM ledger_migrations", {})}
            for migration in migrations(self.dialect):
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

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        try:
            with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield _Cursor(cur, self._jsonb)
        except self._errors as exc:
            raise DependencyUnavailable(f"the ledger database is unavailable: {exc}") from None

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return "PostgresLedger(<url hidden>)"
