"""``imagegen doctor``'s ledger row on both backends: it reads the ledger, and changes nothing
in it (a schema migration cannot be undone, and is the first image's, or the ledger
function's, to apply)."""

from __future__ import annotations

import json
import socket
import sqlite3
from contextlib import closing

import pytest

from imagegen.ledger import backend, ledger_path, open_ledger
from imagegen.ledger._migrate import migrations
from tests.conftest import RunCli


def _ledger_row(cli: RunCli, url: str) -> dict[str, str]:
    result = cli("doctor", "--json", env={"IMAGEGEN_LEDGER_URL": url})
    [row] = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "ledger"]
    return row


def _applied(url: str) -> set[int]:
    """The versions ``ledger_migrations`` records (none where there is no such table)."""
    if backend(url) == "sqlite":
        with closing(sqlite3.connect(str(ledger_path(url)))) as db:
            if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'ledger_migrations'"
            ).fetchall():
                return set()
            return {row[0] for row in db.execute("SELECT version FROM ledger_migrations")}
    import psycopg

    with psycopg.connect(url) as db:
        if db.execute("SELECT to_regclass('ledger_migrations')").fetchone() == (None,):
            return set()
        return {row[0] for row in db.execute("SELECT version FROM ledger_migrations")}


def _forget(url: str, version: int) -> None:
    """Make the ledger look as the release before the migration ``version`` left it."""
    sql = "DELETE FROM ledger_migrations WHERE version = "
    if backend(url) == "sqlite":
        with closing(sqlite3.connect(str(ledger_path(url)))) as db, db:
            db.execute(f"{sql}?", (version,))
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"{sql}%s", (version,))


@pytest.mark.parametrize("ledger_url", ["sqlite", "postgres"], indirect=True)
def test_doctor_says_pending_migrations_without_applying_them(cli: RunCli, ledger_url: str) -> None:
    open_ledger(ledger_url).close()
    known = {m.version for m in migrations(backend(ledger_url))}
    assert _applied(ledger_url) == known
    where = ledger_path(ledger_url) or "the ledger database"
    assert _ledger_row(cli, ledger_url) == {
        "check": "ledger",
        "status": "ok",
        "summary": f"History is recorded in {where}.",
        "next_step": "",
    }

    newest = max(known)
    _forget(ledger_url, newest)
    row = _ledger_row(cli, ledger_url)
    assert row["status"] == "warning", row
    applier = "the first image" if backend(ledger_url) == "sqlite" else "the ledger function"
    assert row["summary"] == (
        f"Ledger {where} has 1 schema migration pending: applied by {applier}, which records"
        " into it."
    )
    assert _applied(ledger_url) == known - {newest}  # still to apply


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_doctor_leaves_a_new_database_empty(cli: RunCli, ledger_url: str) -> None:
    row = _ledger_row(cli, ledger_url)
    assert row["status"] == "warning", row
    count = len(migrations("postgres"))
    assert f"has {count} schema migrations pending" in row["summary"]
    import psycopg

    with psycopg.connect(ledger_url) as db:
        tables = db.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone()
    assert tables == (0,)


def test_doctor_advises_a_database_ledger_as_a_database(
    cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.cli import doctor

    # Refused at once, and tried again until then.
    monkeypatch.setattr(doctor, "_LEDGER_WAIT", 1.0, raising=False)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: refused at once
    url = f"postgresql://imagegen:PgPass42@127.0.0.1:{port}/ledger?connect_timeout=1"
    row = _ledger_row(cli, url)
    assert row["status"] == "error"
    assert row["summary"].startswith("the ledger database cannot be connected to")
    assert "move the file aside" not in row["next_step"]
    assert row["next_step"].startswith("Check IMAGEGEN_LEDGER_URL, and that the database server")
