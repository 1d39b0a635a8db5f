"""Versioned schema migrations: plain SQL files in ``migrations/NNNN_name.sql``.

Each file is written once, in PostgreSQL's types; for SQLite its types are rewritten to the
storage classes the SQLite ledger uses (times as fixed-width UTC ISO-8601 text, which sorts as
it compares; JSON as text; ``BIGSERIAL`` as an autoincrement rowid). Each file is applied once,
in order, inside one transaction with its row in ``ledger_migrations``
(:meth:`~imagegen.ledger._sql.SqlLedger._migrate`, under a lock on PostgreSQL, so replicas that
start together apply each migration exactly once).

A file named ``NNNN_name.postgres.sql`` (or ``.sqlite.sql``) is that dialect's alone: what one
database needs and the other does not (PostgreSQL's B-tree rows are limited in size, SQLite's
are not). The other dialect records its version with nothing to run, so both keep one sequence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["CREATE_TABLE", "Migration", "for_dialect", "migrations", "statements"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(postgres|sqlite))?\.sql$")

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS ledger_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


# PostgreSQL type → SQLite storage class (whole words, in this order).
_SQLITE_TYPES = (
    (re.compile(r"\bBIGSERIAL PRIMARY KEY\b"), "INTEGER PRIMARY KEY AUTOINCREMENT"),
    (re.compile(r"\b(TIMESTAMPTZ|JSONB)\b"), "TEXT"),
    (re.compile(r"\b(SMALLINT|BIGINT)\b"), "INTEGER"),
)


def for_dialect(sql: str, dialect: str) -> str:
    """``sql`` (PostgreSQL) with its types as ``dialect`` stores them."""
    if dialect == "sqlite":
        for pattern, replacement in _SQLITE_TYPES:
            sql = pattern.sub(replacement, sql)
    return sql


def migrations(dialect: str) -> list[Migration]:
    """The migrations for ``dialect`` (``postgres`` or ``sqlite``), oldest first."""
    folder = resources.files("imagegen.ledger").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            only = match[3]
            text = entry.read_text(encoding="utf-8") if only in (None, dialect) else ""
            found.append(Migration(int(match[1]), match[2], for_dialect(text, dialect)))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {dialect} migrations share a version: {versions}")
    return found


def statements(sql: str) -> list[str]:
    """The statements of a migration file (comments dropped; no ``;`` inside literals)."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
