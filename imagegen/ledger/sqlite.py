"""The embedded ledger: one SQLite file, standard library only (a laptop's default).

Writers take the database lock at ``BEGIN IMMEDIATE`` and wait for it (busy timeout), so
several ``imagegen`` processes can record into one file. Reads take no lock a writer holds: each
runs in a deferred transaction, which in WAL mode reads the last commit while another process
writes (SQLite's "Write-Ahead Logging", "Concurrency"), on a connection of reads' own, so that
neither waits behind this process's write waiting for another process's lock.
"""

from __future__ import annotations

import json
import logging
import os
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
from imagegen.ledger._migrate import migrations
from imagegen.ledger._sql import (
    BUSY,
    BUSY_RETRY_AFTER,
    JSON_COLUMNS,
    TIME_COLUMNS,
    SqlLedger,
    Unreadable,
)
from imagegen.ledger._text import storable
from imagegen.ledger.store import ledger_file

__all__ = ["SqliteLedger"]

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_S = 30.0
_READERS = 8
"""Read connections open at once, at most: a read beyond them waits for one to be free.

SQLite keeps the file descriptor of a connection it closes open, for the next one to take,
while another connection of the process holds a lock on the file (POSIX locks belong to the
process, and closing any descriptor of the file would drop them all): each read opened at
once beyond these would leave a descriptor behind."""
_IDLE_READERS = 4
"""Read connections kept open between reads (of :data:`_READERS`); the others close after."""
_WAL_LIMIT = 4 * 1024 * 1024
"""Bytes of ``-wal`` file past which a write, once committed, empties it (and the size SQLite
cuts it back to where it restarts it): SQLite's own checkpoint, after each commit past 1,000
pages, writes the commits into the database, but starts the file over only at a moment no read
is using it, which steady reads beside steady writes rarely leave, so the file would grow."""
_WAL_CHECKPOINT_WAIT_MS = 100
"""How long that emptying waits for the reads using the file to end; past it, it is left."""


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


def _error_name(exc: sqlite3.Error) -> str:
    """SQLite's name for the error (``SQLITE_BUSY``); "" for one the ``sqlite3`` module raises
    itself, which has none (a ``ProgrammingError``: a closed connection, a wrong parameter)."""
    return getattr(exc, "sqlite_errorname", None) or ""


@contextmanager
def _in_transaction(conn: sqlite3.Connection, begin: str) -> Iterator[_Cursor]:
    """``conn`` in one transaction: committed when the block ends, rolled back when it raises."""
    conn.execute(begin)
    try:
        yield _Cursor(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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


def _write_ahead(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Put the database in WAL mode, waiting out another connection doing the same.

    Two processes opening a new ledger at once (two pods, a CLI beside a function) both ask for
    WAL; SQLite answers the second ``SQLITE_BUSY`` at once, without its busy handler (the
    switch needs an exclusive lock, and waiting for one there could deadlock), so it is retried
    here within the same busy timeout.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if _error_name(exc) != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


_NO_SHM = frozenset({"SQLITE_CANTOPEN", "SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_CANTINIT"})
"""What a read-only connection meets reading a WAL-mode database whose ``-shm`` and ``-wal``
files are not there and cannot be made beside it (SQLite 3.22+, "Write-Ahead Logging",
"Read-Only Databases": such a database is read where they exist, or can be made, or the file
is opened ``immutable``)."""


class _CannotRead(DependencyUnavailable):
    """A read-only ledger that cannot be read as it is: the message says what it needs."""


_CANNOT_WRITE = frozenset({"SQLITE_READONLY", "SQLITE_CANTOPEN", *_NO_SHM})
"""What opening a file this process may not write for writing meets (at its first write)."""


def _file_uri(path: Path, query: str) -> str:
    return f"{path.absolute().as_uri()}?{query}"


def _read_only_mount(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted read-only (which nothing can write)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class SqliteLedger(SqlLedger):
    """The ledger in a SQLite file (created, with its folder, when missing unless
    ``must_exist`` or ``read_only``).

    Args:
        path: The database file; ``:memory:`` for a private in-memory ledger.
        must_exist: the file is opened only if it is there: neither it nor its folder is made.
        read_only: what only reads the ledger: the file is opened only if it is there, and
            read-only (``mode=ro``), so a ledger this process may not write is read all the
            same, and nothing is written into it (SQLite may make its empty ``-wal`` and
            ``-shm`` files beside it, where the folder lets it): a file with no ledger in it
            (an empty one) reads as an empty ledger, and a write (:meth:`transaction`) fails.
            Only a schema migration still to apply opens it for writing, to apply it.

    Raises:
        NotFound: ``must_exist`` or ``read_only``, and the file is not there.
        ConfigurationError: ``path`` cannot hold a ledger (a folder, a file that is no SQLite
            database, a file where a folder of its path should be, a ``~`` that names no
            home this process can find).
        DependencyUnavailable: the file cannot be opened or migrated now (permissions, a full
            disk, a lock held past the busy timeout; ``read_only``: a WAL-mode file in a folder
            this process cannot write, without the ``-shm`` and ``-wal`` files SQLite reads it
            by).
        busy_timeout: Seconds a transaction waits for a lock another connection holds, this
            process's threads before it included (30 by default), and a read for a free read
            connection. The ledger function waits less
            (:func:`~imagegen.stages.ledger.sqlite_busy_timeout`), so that its writes are
            answered as a lock not granted, and retried, before its own time runs out; so does
            the command line's history: an image is not held up by another process's long
            write (``imagegen ledger prune``).
    """

    dialect = "sqlite"
    migrations_table = (
        "SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = 'ledger_migrations'"
    )

    def __init__(
        self,
        path: str | Path,
        *,
        must_exist: bool = False,
        read_only: bool = False,
        busy_timeout: float | None = None,
    ) -> None:
        self._busy_timeout = _BUSY_TIMEOUT_S if busy_timeout is None else busy_timeout
        if str(path) != ":memory:":
            path = ledger_file(path)
        self.path = path
        self._must_exist = must_exist or read_only
        self.read_only = read_only
        self._writes_refused = False
        self._is_closed = False
        self.where = str(path)
        self._lock = threading.RLock()
        # Where reads open their own connections (:meth:`statement`): a file this process
        # writes. None where they share the write connection: ``:memory:`` (a second
        # connection to it is another, empty database) and a ledger opened ``read_only``
        # (which writes nothing, so never holds that connection waiting for a lock).
        self._read_target: str | None = None
        self._readers: list[sqlite3.Connection] = []  # idle: each used by one read at a time
        self._readers_lock = threading.Lock()
        self._reader_slots = threading.BoundedSemaphore(_READERS)
        # Where reads have connections of their own, writes empty the write-ahead log once
        # past _WAL_LIMIT (:meth:`_keep_wal_short`); the size the next try waits for.
        self._wal: Path | None = None
        self._checkpoint_at = _WAL_LIMIT
        try:
            self._open()
        except (FileExistsError, NotADirectoryError):
            raise self._unusable("has a file where a folder of its path should be") from None
        except sqlite3.OperationalError as exc:
            raise DependencyUnavailable(f"ledger {self.path} cannot be opened: {exc}") from None
        except _CannotRead as exc:  # says what it needs
            raise DependencyUnavailable(exc.message) from None
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
                if self.read_only and self._open_read_only(path):
                    return
                # Read-write, never create: gone since, it is an error, not a new ledger.
                target = _file_uri(path, "mode=rw")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect(target)
        try:
            try:
                if isinstance(path, Path):
                    _write_ahead(self._conn, self._busy_timeout)
                self._conn.execute("PRAGMA synchronous=NORMAL")
                if isinstance(path, Path) and not self.read_only:
                    # The file as the write connection found it (a relative path resolved
                    # now, not against a later working directory); it exists by now.
                    self._read_target = _file_uri(path, "mode=rw")
                    self._readers.append(self._reader())
                    self._wal = path.with_name(path.name + "-wal")
                    self._conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
                self._migrate()
            except sqlite3.OperationalError as exc:
                if not self.read_only or _error_name(exc) not in _CANNOT_WRITE:
                    raise
                raise _CannotRead(
                    f"ledger {path} cannot be read before the schema migrations this release "
                    f"adds are applied to it, which needs write access to it ({exc})"
                ) from None
            if self.read_only:  # migrated: from here on it reads only, as opened for
                self._read_only_now()
        except BaseException:
            self._close_readers()
            self._conn.close()
            raise

    def _read_only_now(self) -> None:
        """Refuse writes from now on: :meth:`transaction` here, and SQLite's ``query_only``
        below it (a read-only connection already refuses them; a migrated one, opened for
        writing to apply a migration, so refuses them too)."""
        self._conn.execute("PRAGMA query_only=ON")
        self._writes_refused = True

    def _connect(self, target: str | Path) -> sqlite3.Connection:
        # The write connection is shared by this process's threads, one transaction at a time
        # (the lock); a read connection by one read at a time (taken from the idle ones).
        # Transactions are explicit, so autocommit mode (isolation_level=None).
        return sqlite3.connect(
            target,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=isinstance(target, str) and target.startswith("file:"),
        )

    def _open_read_only(self, path: Path) -> bool:
        """Open ``path`` read-only; False where a migration is still to apply (the caller opens
        it for writing, to apply it). Nothing is written to the file.

        A file with no ledger in it (empty: nothing recorded yet) reads as an empty ledger, kept
        in memory: its schema is not written into the file.
        """
        self._conn = self._connect(_file_uri(path, "mode=ro"))
        try:
            try:
                done = self._versions()
            except sqlite3.OperationalError as exc:
                if _error_name(exc) not in _NO_SHM:
                    raise
                self._conn.close()
                self._conn = self._without_shm(path)
                done = self._versions()
            if done and not {m.version for m in migrations(self.dialect)} <= done:
                self._conn.close()
                return False
            if not done:
                self._conn.close()
                self._conn = self._connect(":memory:")
            self._migrate()  # nothing to apply on the file: reads the versions, warns if newer
            self._read_only_now()
        except BaseException:
            self._conn.close()
            raise
        return True

    def _reader(self) -> sqlite3.Connection:
        """A connection for reads only: ``query_only``, so a read that wrote would fail rather
        than take the write lock on a connection no write waits for."""
        assert self._read_target is not None
        conn = self._connect(self._read_target)
        try:
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _versions(self) -> set[int]:
        """The migrations the file records, read on the connection itself: a file that is no
        SQLite database raises ``sqlite3.DatabaseError`` to the caller, which says the path
        cannot hold a ledger (as opening it for writing does), not that a ledger is damaged."""
        if not self._conn.execute(self.migrations_table).fetchall():
            return set()
        return {row[0] for row in self._conn.execute("SELECT version FROM ledger_migrations")}

    def _without_shm(self, path: Path) -> sqlite3.Connection:
        """A connection to a WAL-mode ``path`` whose ``-shm``/``-wal`` files SQLite cannot make.

        On a file system mounted read-only nothing can write the file while it is read, so it
        is opened ``immutable`` (SQLite's "URI filenames": read with no locks and no ``-shm``);
        a ``-wal`` file there, holding commits not yet in the database, would be ignored, so
        that is refused as the rest. Elsewhere the file's owner may write it meanwhile, and a
        reader without the ``-shm`` file cannot see where: refused, saying what is needed.
        """
        wal = path.with_name(path.name + "-wal")
        if _read_only_mount(path) and not wal.exists():
            return self._connect(_file_uri(path, "mode=ro&immutable=1"))
        raise _CannotRead(
            f"ledger {path} cannot be read without write access to {path.parent}: SQLite "
            f"reads a WAL-mode database only beside its {path.name}-shm and -wal files, "
            "which are not there (they are while a process that writes the ledger has it open)"
        )

    def _unusable(self, why: str) -> ConfigurationError:
        """The ledger's path is wrong: the setting (or ``--ledger``) must change."""
        return ConfigurationError(
            f"ledger {self.path} {why}",
            errors=[{"field": "ledger_url", "message": why}],
        )

    @contextmanager
    def transaction(self) -> Iterator[_Cursor]:
        with self._writing(None) as cursor:
            yield cursor

    @contextmanager
    def _writing(self, deadline: float | None) -> Iterator[_Cursor]:
        """A write transaction whose waits, for the connection and the lock, end at the busy
        timeout or at ``deadline``, whichever comes first (:meth:`_turn`)."""
        if self._writes_refused:
            raise InternalError(f"ledger {self.path} is open read-only: it cannot be written")
        with self._within("BEGIN IMMEDIATE", deadline) as cursor:
            yield cursor

    @contextmanager
    def statement(self) -> Iterator[_Cursor]:
        """A read: a deferred transaction, one snapshot for its statements, which takes no lock
        a writer waits for or holds (WAL mode), on a connection of reads' own: never behind
        this process's write waiting for another process's lock. It reads the last commit, so
        what this process committed before it too. A ``:memory:`` or ``read_only`` ledger
        reads on its one connection."""
        if self._read_target is None:
            with self._within("BEGIN DEFERRED") as cursor:
                yield cursor
            return
        with (
            self._reading() as conn,
            self._errors(),
            _in_transaction(conn, "BEGIN DEFERRED") as cursor,
        ):
            yield cursor

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read connection for one read: an idle one, or one opened for it, once fewer than
        :data:`_READERS` are in use (waited for within the busy timeout: past it, the lock's
        retryable answer); kept for the next read after it (up to :data:`_IDLE_READERS`),
        closed where the ledger closed meanwhile."""
        if not self._reader_slots.acquire(timeout=self._busy_timeout):
            logger.warning("ledger %s: every read connection was busy past the wait", self.path)
            raise DependencyUnavailable(BUSY, retry_after=BUSY_RETRY_AFTER)
        try:
            with self._reader_slot() as conn:
                yield conn
        finally:
            self._reader_slots.release()

    @contextmanager
    def _reader_slot(self) -> Iterator[sqlite3.Connection]:
        with self._readers_lock:
            if self._is_closed:
                raise self._closed()
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            try:
                conn = self._reader()
            except sqlite3.Error as exc:  # the file gone, or its permissions changed, since
                raise DependencyUnavailable(
                    f"ledger {self.path} cannot be opened: {first_line(exc)}"
                ) from None
        try:
            yield conn
        finally:
            with self._readers_lock:
                # One left in a transaction (its rollback failed) would refuse the next BEGIN.
                keep = not self._is_closed and not conn.in_transaction
                keep = keep and len(self._readers) < _IDLE_READERS
                if keep:
                    self._readers.append(conn)
            if not keep:
                conn.close()

    @property
    def busy_timeout(self) -> float:
        """Seconds a transaction waits for a lock another connection holds, in all."""
        return self._busy_timeout

    @contextmanager
    def _within(self, begin: str, deadline: float | None = None) -> Iterator[_Cursor]:
        with self._turn(deadline), self._errors():
            if self._is_closed:
                raise self._closed()
            with _in_transaction(self._conn, begin) as cursor:
                yield cursor
            if begin == "BEGIN IMMEDIATE":
                self._keep_wal_short()

    def _keep_wal_short(self) -> None:
        """Empty the ``-wal`` file once past :data:`_WAL_LIMIT`, in the turn of the write that
        took it there: ``wal_checkpoint(TRUNCATE)`` writes its commits into the database and
        cuts it to nothing, waiting :data:`_WAL_CHECKPOINT_WAIT_MS` (not a busy timeout) for the
        reads using it to end. One that cannot (a long read, another process's write) is tried
        again once the file grew by a quarter of the limit: a read that holds it up for long
        costs the writes meanwhile one such wait for each 1 MiB they write. The write before it
        is committed either way.
        """
        if self._wal is None:
            return
        try:
            size = self._wal.stat().st_size
        except OSError:
            return
        if size < _WAL_LIMIT:  # started over meanwhile, and cut back to it (journal_size_limit)
            self._checkpoint_at = _WAL_LIMIT
        if size < self._checkpoint_at:
            return
        try:
            # The next turn sets the busy timeout its wait has left (:meth:`_turn`).
            self._conn.execute(f"PRAGMA busy_timeout = {_WAL_CHECKPOINT_WAIT_MS}")
            # (busy, frames in the file, frames written back); busy: a lock not granted.
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            logger.warning("ledger %s: its write-ahead log was not emptied: %s", self.path, exc)
            busy = 1
        self._checkpoint_at = size + _WAL_LIMIT // 4 if busy else _WAL_LIMIT

    @contextmanager
    def _turn(self, deadline: float | None = None) -> Iterator[None]:
        """This process's connection, for one transaction, and then the database's lock, waited
        for within one busy timeout in all: the thread before may hold the connection while it
        waits out the busy timeout for another process's lock, and each thread queued behind
        it would otherwise wait a busy timeout of its own after it, past the ledger function's
        time to answer, rather than be answered as a lock not granted.

        ``deadline`` (a :func:`time.monotonic`) ends both waits sooner: the ledger function's
        request waited for a thread to run on before it got here, and that wait counts too.
        Past it, the connection and the lock are each taken only if free at once."""
        until = time.monotonic() + self._busy_timeout
        if deadline is not None:
            until = min(until, deadline)
        if not self._lock.acquire(timeout=max(until - time.monotonic(), 0.0)):
            logger.warning("ledger %s: its connection was busy past the wait for a lock", self.path)
            raise DependencyUnavailable(BUSY, retry_after=BUSY_RETRY_AFTER)
        try:
            if not self._is_closed:
                left = until - time.monotonic()
                # The timeout sqlite3.connect set, the same handler (0: answered at once).
                self._conn.execute(f"PRAGMA busy_timeout = {max(int(left * 1000), 0)}")
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """A damaged file, found by a statement after it opened, said in one line; a lock held
        past the busy timeout, retryable, as PostgreSQL's lock conflicts are answered."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            name = _error_name(exc)
            if name in _DAMAGED:
                raise InternalError(f"ledger {self.path} is unreadable: {exc}") from None
            if "_".join(name.split("_")[:2]) in _BUSY:
                logger.warning("ledger %s: %s (%s)", self.path, exc, name)
                raise DependencyUnavailable(BUSY, retry_after=BUSY_RETRY_AFTER) from None
            raise

    def close(self) -> None:
        """Close the connections: the write connection once its transaction ends, the idle read
        ones now, and one a read is using as that read ends."""
        with self._lock:
            self._close_readers()
            self._conn.close()

    def _close_readers(self) -> None:
        """Refuse reads from now on, and close the idle read connections."""
        with self._readers_lock:
            self._is_closed = True
            idle, self._readers = self._readers, []
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"
