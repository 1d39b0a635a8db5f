"""Versioned schema migrations: plain SQL files in ``migrations/<dialect>/NNNN_name.sql``.

Each file is applied once, in order, inside one transaction with its row in
``ledger_migrations``; the stores run :func:`pending` at start-up under a lock, so replicas that
start together apply each migration exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

__all__ = ["Migration", "migrations", "statements"]

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS ledger_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """The migrations shipped for ``dialect`` (``postgres`` or ``sqlite``), oldest first."""
    folder = resources.files("imagegen.ledger").joinpath("migrations", dialect)
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two {dialect} migrations share a version: {versions}")
    return found


def statements(sql: str) -> list[str]:
    """The statements of a migration file (comments dropped; no ``;`` inside literals)."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
