"""The ledger contract and how a URL picks its backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, runtime_checkable

from imagegen._paths import NoHome, expanded
from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.ledger.models import (
    Delivery,
    GenerationDetail,
    GenerationPage,
    IngestResult,
    LedgerEvent,
    Status,
)

__all__ = [
    "Ledger",
    "backend",
    "default_ledger_path",
    "ledger_path",
    "open_ledger",
    "open_unmigrated",
]


@runtime_checkable
class Ledger(Protocol):
    """Every imagegen event once, one row per generation, and the webhook outbox."""

    dialect: str
    where: str
    """How an error names this ledger: a file's path, never a URL (it may hold a password)."""
    newer_schema: tuple[int, int] | None
    """(the database's schema version, the highest this release knows) where a newer release
    migrated it (opened all the same: docs/ledger.md); None otherwise."""

    def ingest(self, event: LedgerEvent, *, deadline: float | None = None) -> IngestResult:
        """Record ``event`` once (by source + id) and fold it into its generation.

        ``deadline``: a :func:`time.monotonic` by which a write that waits for a lock is
        answered as a lock not granted (a retryable ``DependencyUnavailable``), counted from
        when the caller's request came rather than from when this call began to run (a
        request may wait for a thread first); a SQLite ledger's waits end at it, or at its busy
        timeout if sooner. None: the busy timeout alone (the command line).
        """

    def get(self, generation_id: str) -> GenerationDetail | None:
        """One generation with its timeline; None when unknown."""

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
        """Generations newest first, a page at a time."""

    def generation_events(
        self, generation_id: str, *, order: Literal["time", "recorded"] = "time"
    ) -> list[LedgerEvent]:
        """One generation's events, in time order, or in the order recorded."""

    def events(self, *, since: datetime | None = None) -> Iterator[LedgerEvent]:
        """Every event, in the order recorded."""

    def export_jsonl(self, out: TextIO, *, since: datetime | None = None) -> int:
        """Write the events as JSON lines; returns how many."""

    def prune(self, older_than: timedelta) -> dict[str, int]:
        """Delete what is older than the retention; returns rows deleted by table."""

    def claim_deliveries(self, *, limit: int = 20, lease: float = 60.0) -> list[Delivery]:
        """Take due webhook messages for one attempt."""

    def finish_delivery(
        self,
        msg_id: str,
        *,
        delivered: bool,
        error: str | None = None,
        retry_in: float | None,
        attempts: int | None = None,
    ) -> bool:
        """Record the outcome of one claim (only while still on it, given its ``attempts``)."""

    def release_deliveries(self, claimed: list[Delivery]) -> int:
        """Give back claimed messages that were not sent: due now, attempts as before."""

    def delivery_states(self, generation_id: str) -> dict[str, dict[str, Any]]:
        """Webhook messages of one generation by event."""

    def transaction(self) -> AbstractContextManager[Any]:
        """A transaction on the underlying database."""

    def close(self) -> None:
        """Release the connections."""


def default_ledger_path() -> Path:
    """Where ``imagegen`` on a laptop keeps its ledger: ``$XDG_DATA_HOME/imagegen/ledger.db``.

    A relative ``XDG_DATA_HOME`` is ignored, as unset: the XDG Base Directory specification
    holds such a path invalid (it would name another file in each working directory).

    Raises:
        ConfigurationError: no home to keep it in (no ``HOME``, no user entry), naming
            ``ledger_url``.
    """
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(Path.home() / ".local" / "share")
        except RuntimeError:  # pathlib's "Could not determine home directory."
            why = "no HOME, XDG_DATA_HOME or home directory to keep the ledger in"
            raise ConfigurationError(
                f"ledger: {why}: set IMAGEGEN_LEDGER_URL",
                errors=[{"field": "ledger_url", "message": why}],
            ) from None
    return Path(base) / "imagegen" / "ledger.db"


def backend(url: str | None) -> Literal["sqlite", "postgres"]:
    """Which backend ``url`` names (the forms :func:`open_ledger` takes); nothing is opened.

    Raises:
        InvalidRequest: an unsupported URL scheme.
    """
    if url is None:
        return "sqlite"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    if scheme in ("sqlite", ""):
        return "sqlite"
    raise InvalidRequest(
        f"unsupported ledger URL scheme {scheme!r}: use postgresql://, sqlite:/// or a path",
        errors=[{"field": "ledger_url", "message": "unsupported scheme"}],
    )


def ledger_path(url: str | None) -> Path | None:
    """The SQLite file ``url`` names (the forms :func:`open_ledger` takes); None for PostgreSQL
    or ``:memory:``. Nothing is opened.

    Raises:
        InvalidRequest: an unsupported URL scheme.
        ConfigurationError: a path whose ``~`` names no home this process can find (an
            unknown ``~user``), naming ``ledger_url``.
    """
    if backend(url) == "postgres":
        return None
    if url is None:
        return default_ledger_path()
    # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db
    path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else url
    if path == ":memory:":
        return None
    return ledger_file(path)


def ledger_file(path: str | Path) -> Path:
    """``path``, a SQLite ledger's file, with ``~`` expanded.

    Raises:
        ConfigurationError: its ``~`` names no home this process can find, naming
            ``ledger_url``.
    """
    try:
        return expanded(path)
    except NoHome as exc:
        raise ConfigurationError(
            f"ledger {path}: {exc}", errors=[{"field": "ledger_url", "message": str(exc)}]
        ) from None


def open_ledger(
    url: str | None = None,
    *,
    must_exist: bool = False,
    read_only: bool = False,
    busy_timeout: float | None = None,
) -> Ledger:
    """Open (and migrate) the ledger ``url`` names.

    Args:
        url: ``postgresql://…`` (or ``postgres://…``), ``sqlite:///path``, a file path, or
            None for the laptop default (:func:`default_ledger_path`).
        must_exist: a SQLite file that is not there is not made (nor its folders): what
            only reads the ledger.
        read_only: ``must_exist``, and a SQLite file is opened read-only: one this process may
            not write is read, nothing is written into it (SQLite may leave its empty ``-wal``
            and ``-shm`` beside it; one with no ledger in it, an empty file, reads as an empty
            ledger), and writes fail (``InternalError``). Only a migration still to apply opens
            it for writing. A PostgreSQL database is opened as without it.
        busy_timeout: Seconds a SQLite ledger's statement waits for a lock another process
            holds (default 30); a PostgreSQL database is opened as without it.

    Raises:
        InvalidRequest: an unsupported URL scheme.
        NotFound: ``must_exist`` or ``read_only``, and the SQLite file is not there.
        DependencyUnavailable: the database cannot be reached.
    """
    if backend(url) == "postgres":
        from imagegen.ledger.postgres import PostgresLedger

        assert url is not None
        return PostgresLedger(url)
    from imagegen.ledger.sqlite import SqliteLedger

    return SqliteLedger(
        ledger_path(url) or ":memory:",
        must_exist=must_exist,
        read_only=read_only,
        busy_timeout=busy_timeout,
    )


def open_unmigrated(url: str | None, *, timeout: float = 10.0) -> tuple[Ledger, int]:
    """Open the ledger ``url`` names to look at it, applying no migration (what a diagnostic
    does: a migration cannot be undone); with how many of this release's migrations it lacks.

    A SQLite file is opened as ``read_only`` opens it (it must exist; nothing is written), and
    a pending migration leaves it so; a PostgreSQL database is connected to and read. Where
    migrations are pending, what they add is not there: only :attr:`Ledger.where` and
    :meth:`Ledger.close` are sure to work. ``newer_schema`` is set as :func:`open_ledger`
    sets it. ``timeout``: seconds to wait for a PostgreSQL connection.

    Raises:
        As :func:`open_ledger` with ``read_only``.
    """
    from imagegen.ledger._migrate import migrations
    from imagegen.ledger._sql import SqlLedger

    def read_versions(ledger: SqlLedger) -> int:
        known = {migration.version for migration in migrations(ledger.dialect)}
        with ledger.statement() as db:
            done = ledger._applied(db)
        newest, highest = max(done, default=0), max(known)
        ledger.newer_schema = (newest, highest) if newest > highest else None
        return len(known - done)

    if backend(url) == "postgres":
        from imagegen.ledger.postgres import PostgresLedger

        class CheckedPostgres(PostgresLedger):
            pending = 0

            def _migrate(self) -> None:  # read, never applied
                self.pending = read_versions(self)

        assert url is not None
        postgres = CheckedPostgres(url, min_size=1, max_size=1, timeout=timeout)
        return postgres, postgres.pending
    from imagegen.ledger.sqlite import SqliteLedger

    class CheckedSqlite(SqliteLedger):
        pending = 0

        def _versions(self) -> set[int]:
            # The read-only opening reopens the file for writing where a migration is
            # pending (to apply it): here it reads on, read-only, whatever the file records.
            found = super()._versions()
            return found | {m.version for m in migrations(self.dialect)} if found else found

        def _migrate(self) -> None:  # read, never applied
            self.pending = read_versions(self)

    sqlite = CheckedSqlite(ledger_path(url) or ":memory:", read_only=True)
    return sqlite, sqlite.pending
