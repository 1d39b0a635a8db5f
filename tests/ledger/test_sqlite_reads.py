"""The SQLite ledger's reads beside its own writes: a read never waits behind this process's
write waiting for another process's lock, and still sees what this process committed."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.ledger import Ledger, open_ledger
from imagegen.ledger import sqlite as sqlite_ledger
from imagegen.ledger._sql import BUSY
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain, recorded_file

pytestmark = pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)

AT_ONCE_S = 5.0
"""A read that answered without waiting: well under any busy timeout here (20 s and 30 s)."""


@pytest.fixture
def path(ledger_url: str) -> Path:
    """A ledger file with one generation recorded, enhanced."""
    return recorded_file(ledger_url)


@pytest.fixture
def holder(path: Path) -> Iterator[Callable[[], None]]:
    """Another process holding the write lock on ``path`` (``BEGIN IMMEDIATE``), with a delete
    not yet committed; calling the fixture's value rolls it back and ends the process."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "c.execute(\"DELETE FROM generations WHERE generation_id = 'gen-1'\")\n"
            "print('writing', flush=True)\n"
            "sys.stdin.read()\n"
            "c.execute('ROLLBACK')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "writing\n"

    def release() -> None:
        assert process.stdin is not None
        if not process.stdin.closed:
            process.stdin.close()
        assert process.wait(timeout=30) == 0

    try:
        yield release
    finally:
        release()


def _waiting(write: Future[Any]) -> None:
    """Let ``write`` start, and check that it waits (for the lock another process holds)."""
    time.sleep(0.5)
    assert not write.done(), write.result()


def _reads_last_commit(ledger: Ledger) -> None:
    """Every read the ledger has, each as last committed (the other process's delete unseen)."""
    found = ledger.get("gen-1")
    assert found is not None and found.status == "enhanced"
    assert [g.generation_id for g in ledger.history().items] == ["gen-1"]
    assert len(ledger.generation_events("gen-1", order="recorded")) == 2
    assert ledger.delivery_states("gen-1")["started"]["state"] == "pending"
    assert ledger.export_jsonl(io.StringIO()) == 2


def test_reads_answer_at_once_while_this_process_waits_for_the_write_lock(
    path: Path, holder: Callable[[], None]
) -> None:
    """The write waits as before, and commits once the lock is granted; the reads meanwhile
    answer the last commit without waiting behind it, and the one after it sees the write."""
    ledger = open_ledger(f"sqlite:///{path}")  # a 30 s busy timeout
    try:
        with ThreadPoolExecutor(1) as pool:
            write = pool.submit(ledger.ingest, chain("gen-1")["rendered"])
            _waiting(write)
            started = time.monotonic()
            _reads_last_commit(ledger)
            assert time.monotonic() - started < AT_ONCE_S
            assert not write.done()  # still waiting: the reads did not wait for it

            holder()
            write.result(timeout=30)
        found = ledger.get("gen-1")  # this process's write, committed: read at once
        assert found is not None and found.status == "rendered"
    finally:
        ledger.close()


def test_a_write_that_waits_past_the_busy_timeout_is_still_a_retryable_503_beside_reads(
    path: Path, holder: Callable[[], None]
) -> None:
    ledger = open_ledger(f"sqlite:///{path}", busy_timeout=3.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            write = pool.submit(ledger.ingest, chain("gen-1")["rendered"])
            _waiting(write)
            _reads_last_commit(ledger)
            read_in = time.monotonic() - started
            with pytest.raises(DependencyUnavailable) as caught:
                write.result(timeout=30)
            waited = time.monotonic() - started
        assert caught.value.message == BUSY and caught.value.retry_after == 1.0
        assert read_in < 2.0 < waited  # the reads answered before the write gave up
        found = ledger.get("gen-1")
        assert found is not None and found.status == "enhanced"
    finally:
        ledger.close()


def test_the_function_answers_a_status_query_while_an_event_waits_for_the_write_lock(
    path: Path, holder: Callable[[], None], serve_ledger: Callable[..., InProcessFunction]
) -> None:
    """A GET is not held up by the event being written meanwhile (nor by the webhook
    dispatcher's claim, which waits for the lock on the same connection)."""
    function = serve_ledger()  # its busy timeout: 20 s
    assert function.get("/generations/gen-1").status_code == 200  # opened
    with ThreadPoolExecutor(1) as pool:
        post = pool.submit(function.post, "/", **binary(chain("gen-1")["rendered"]))
        _waiting(post)
        started = time.monotonic()
        answer = function.get("/generations/gen-1")
        assert time.monotonic() - started < AT_ONCE_S
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "enhanced"
        assert not post.done()

        holder()
        posted = post.result(timeout=30)
    assert posted.status_code < 300, posted.text
    assert function.get("/generations/gen-1").json()["status"] == "rendered"


def test_each_thread_reads_what_it_has_just_written(path: Path) -> None:
    """A read right after this process's commit sees it, on whichever connection it runs."""
    ledger = open_ledger(f"sqlite:///{path}")

    def write_then_read(n: int) -> None:
        gid = f"gen-rw-{n}"
        for name in ("requested", "enhanced", "rendered"):
            ledger.ingest(chain(gid)[name])
            found = ledger.get(gid)
            assert found is not None and found.status == name
        assert len(ledger.generation_events(gid)) == 3

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(write_then_read, range(32)))
        assert len(ledger.history(limit=100).items) == 33
    finally:
        ledger.close()


def test_an_in_memory_ledger_reads_what_it_wrote(ledger_url: str) -> None:
    """A second connection to ``:memory:`` would be another, empty database: its reads share
    the one connection."""
    ledger = open_ledger("sqlite:///:memory:")
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: ledger.ingest(chain(f"gen-{n}")["requested"]), range(8)))
            found = list(pool.map(lambda n: ledger.get(f"gen-{n}"), range(8)))
        assert all(g is not None and g.status == "requested" for g in found)
        assert len(ledger.history().items) == 8
    finally:
        ledger.close()


def test_closing_closes_every_connection_reads_opened(path: Path) -> None:
    """SQLite removes a WAL-mode file's ``-wal`` as its last connection closes: one left open
    by a read keeps it."""
    ledger = open_ledger(f"sqlite:///{path}")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _reads_last_commit(ledger), range(16)))
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()
    with closing(sqlite3.connect(path)) as conn:  # what lets reads beside a writer
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    ledger.close()
    assert not wal.exists()
    with pytest.raises(DependencyUnavailable, match="is closed"):
        ledger.get("gen-1")


def _descriptors(path: Path) -> int:
    """File descriptors this process has open on ``path`` itself (not its ``-wal`` or ``-shm``)."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve())
        except OSError:  # closed since it was listed
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists descriptors in /proc")
def test_a_burst_of_reads_leaves_no_more_descriptors_than_read_connections(path: Path) -> None:
    """SQLite keeps a closed connection's descriptor open while the process holds locks on the
    file: reads opening a connection each would leave one behind per read at once."""
    ledger = open_ledger(f"sqlite:///{path}")
    at_once = threading.Barrier(64)

    def read(_: int) -> list[dict[str, Any]]:
        at_once.wait()
        with ledger.statement() as db:
            time.sleep(0.05)  # a read long enough for the others to start meanwhile
            return db.query("SELECT status FROM generations", {})

    try:
        with ThreadPoolExecutor(64) as pool:
            assert all(rows == [{"status": "enhanced"}] for rows in pool.map(read, range(64)))
        ledger.ingest(chain("gen-1")["rendered"])
        # The write connection's, and one for each read connection open at once.
        assert _descriptors(path) <= sqlite_ledger._READERS + 1
    finally:
        ledger.close()
    assert _descriptors(path) == 0


def test_a_read_waits_for_a_free_read_connection_within_the_busy_timeout(path: Path) -> None:
    """Reads beyond the read connections wait for one; past the busy timeout, the lock's
    retryable answer; and one freed is used by the next read."""
    ledger = open_ledger(f"sqlite:///{path}", busy_timeout=0.5)
    release = threading.Event()
    reading = threading.Barrier(sqlite_ledger._READERS + 1)

    def hold(_: int) -> None:
        with ledger.statement() as db:
            db.query("SELECT 1 AS one", {})
            reading.wait()
            release.wait(timeout=30)

    try:
        with ThreadPoolExecutor(sqlite_ledger._READERS + 1) as pool:
            try:
                held = [pool.submit(hold, n) for n in range(sqlite_ledger._READERS)]
                reading.wait(timeout=30)
                started = time.monotonic()
                with pytest.raises(DependencyUnavailable) as caught:
                    ledger.get("gen-1")
                assert 0.4 < time.monotonic() - started < AT_ONCE_S
                assert caught.value.message == BUSY and caught.value.retry_after == 1.0

                waiting = pool.submit(ledger.get, "gen-1")
                time.sleep(0.1)
                assert not waiting.done(), waiting.result()
            finally:
                release.set()
            found = waiting.result(timeout=30)
            for future in held:
                future.result(timeout=30)
        assert found is not None and found.status == "enhanced"
    finally:
        ledger.close()


def test_steady_reads_beside_steady_writes_keep_the_write_ahead_log_short(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's own checkpoint starts the ``-wal`` file over only at a moment no read uses it,
    which reads looping beside the writes rarely leave: the writes empty it past its limit."""
    limit = 1024 * 1024  # the default, 4 MiB, scaled down to keep this short
    monkeypatch.setattr(sqlite_ledger, "_WAL_LIMIT", limit)
    ledger = open_ledger(f"sqlite:///{path}")
    wal = path.with_name(path.name + "-wal")
    stop = threading.Event()
    reads = 0

    def read() -> None:
        nonlocal reads
        while not stop.is_set():
            ledger.history(limit=50)
            reads += 1

    largest = 0
    readers = [threading.Thread(target=read) for _ in range(4)]
    try:
        for reader in readers:
            reader.start()
        for n in range(250):
            for name in ("requested", "enhanced", "rendered"):
                ledger.ingest(chain(f"gen-wal-{n}")[name])
                largest = max(largest, wal.stat().st_size)
    finally:
        stop.set()
        for reader in readers:
            reader.join(timeout=30)
        ledger.close()
    assert reads > 100  # the reads ran beside the writes
    # Past the limit by the commits of the writes since a checkpoint a read held up, if any.
    assert largest < 4 * limit, f"{largest / limit:.1f} MiB"
