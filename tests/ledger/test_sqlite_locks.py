"""The SQLite ledger beside another process writing the same file: reads never wait for it, and
a write that waits past the busy timeout is a retryable 503, as on PostgreSQL."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.ledger import open_ledger
from imagegen.ledger._migrate import migrations
from imagegen.ledger._sql import BUSY
from imagegen.ledger.sqlite import SqliteLedger
from imagegen.settings import Settings
from imagegen.stages import ledger as ledger_stage
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain, recorded_file

pytestmark = pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)

BUSY_TIMEOUT_S = 2.0  # the ledger's is 30 s: a read that waited for the writer fails in 2


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's busy timeout 2 s, and the function's time to answer shortened in
    proportion: its busy timeout, the same share of it, 2 s too."""
    monkeypatch.setattr("imagegen.ledger.sqlite._BUSY_TIMEOUT_S", BUSY_TIMEOUT_S)
    monkeypatch.setattr(
        "imagegen.stages.ledger.TIMEOUT_S", BUSY_TIMEOUT_S / ledger_stage.SQLITE_BUSY_SHARE
    )


@pytest.fixture
def path(ledger_url: str, short_busy_timeout: None) -> Path:
    """A ledger file with one generation recorded."""
    return recorded_file(ledger_url)


@pytest.fixture
def writing(path: Path) -> Iterator[None]:
    """Another process in a write transaction on ``path``, with a row not yet committed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "c.execute(\"DELETE FROM generations WHERE generation_id = 'gen-1'\")\n"
            "print('writing', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "writing\n"
    try:
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def test_reads_and_opening_answer_at_once_while_another_process_writes(
    path: Path, writing: None
) -> None:
    """WAL lets a reader read the last commit beside a writer; a read that asked for the write
    lock (BEGIN IMMEDIATE) waited out the busy timeout, then failed."""
    started = time.monotonic()
    ledger = open_ledger(f"sqlite:///{path}")  # nothing to migrate: no lock taken
    try:
        found = ledger.get("gen-1")  # as last committed: the writer's delete is not seen
        assert found is not None and found.status == "enhanced"
        assert [g.generation_id for g in ledger.history().items] == ["gen-1"]
        assert len(ledger.generation_events("gen-1", order="recorded")) == 2
        assert ledger.delivery_states("gen-1")["started"]["state"] == "pending"
        out = io.StringIO()
        assert ledger.export_jsonl(out) == 2
    finally:
        ledger.close()
    assert time.monotonic() - started < BUSY_TIMEOUT_S / 2


def test_the_function_answers_a_status_query_while_another_process_writes(
    path: Path, writing: None, serve_ledger: Callable[..., InProcessFunction]
) -> None:
    function = serve_ledger()
    started = time.monotonic()
    answer = function.get("/generations/gen-1")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "enhanced"
    assert time.monotonic() - started < BUSY_TIMEOUT_S / 2


def test_a_write_that_waits_past_the_busy_timeout_is_a_retryable_503(
    path: Path,
    writing: None,
    serve_ledger: Callable[..., InProcessFunction],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As PostgreSQL's lock conflicts are answered (test_postgres): a fixed message, logged
    with what SQLite said, not a 500 that Knative would not retry."""
    ledger = open_ledger(f"sqlite:///{path}")
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            ledger.ingest(chain("gen-1")["rendered"])
    finally:
        ledger.close()
    assert caught.value.message == BUSY and caught.value.retry_after == 1.0
    assert "SQLITE_BUSY" in caplog.text

    answer = serve_ledger().post("/", **binary(chain("gen-1")["persisted"]))
    assert answer.status_code == 503, answer.text
    assert answer.json()["message"] == BUSY and answer.headers["retry-after"] == "1"


def test_the_functions_busy_timeout_runs_out_well_before_its_own_time_to_answer(
    ledger_url: str, serve_ledger: Callable[..., InProcessFunction]
) -> None:
    """As configured, unshortened: a lock held past the function's busy timeout is answered
    as such (Retry-After: 1), with time left for the write once granted, never as the
    function's own timeout (Retry-After: 10) that a busy timeout as long would meet first."""
    serve_ledger()
    [(opened, _)] = ledger_stage._opened.values()
    assert isinstance(opened, SqliteLedger)
    answers_in = ledger_stage.STAGE.timeout(Settings())
    assert opened.busy_timeout <= answers_in - 5.0
    assert opened.busy_timeout >= 10.0  # no shorter than needed: a CLI write may take seconds


def test_a_write_lock_held_by_another_process_is_answered_as_such_to_each_waiting_event(
    path: Path, writing: None, serve_ledger: Callable[..., InProcessFunction]
) -> None:
    """Events waiting at once for the same held lock are each answered within the busy
    timeout, with the documented lock answer: the ones queued in this process behind the
    first's wait count theirs in it, rather than each starting its own after it (and running
    past the function's time, into its 503 "ledger took longer than …", Retry-After: 10)."""
    function = serve_ledger()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda name: function.post("/", **binary(chain("gen-1")[name])),
                ["rendered", "persisted", "failed", "requested"],
            )
        )
    took = time.monotonic() - started
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["message"] == BUSY, answer.text
        assert answer.headers["retry-after"] == "1"
    assert BUSY_TIMEOUT_S <= took < ledger_stage.TIMEOUT_S


def test_events_waiting_for_a_thread_are_answered_as_a_lock_not_granted_in_time(
    path: Path, writing: None, serve_ledger: Callable[..., InProcessFunction]
) -> None:
    """A replica takes more events at once than its loop has threads to write them on. The
    ones queued for a thread count that wait in the lock's share of the function's time: each
    is answered as a lock not granted (Retry-After: 1) within it, none with the function's own
    "ledger took longer than …" (Retry-After: 10), which a wait counted only once a thread
    runs the write would meet."""
    function = serve_ledger()
    [served] = function._mine
    threads = ThreadPoolExecutor(2)  # the loop's default executor, narrower than the events
    served._loop.call_soon_threadsafe(served._loop.set_default_executor, threads)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda gid: function.post("/", **binary(chain(gid)["requested"])),
                    [f"gen-queued-{n}" for n in range(6)],
                )
            )
        took = time.monotonic() - started
    finally:
        threads.shutdown(wait=False)
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["message"] == BUSY, answer.text
        assert answer.headers["retry-after"] == "1"
    assert took < ledger_stage.TIMEOUT_S - 0.5


def test_a_write_whose_deadline_has_passed_takes_the_lock_only_if_it_is_free(path: Path) -> None:
    """Past its deadline a write is still made where nothing holds the lock; where another
    process holds it, it is answered as a lock not granted at once, not a busy timeout later."""
    ledger = open_ledger(f"sqlite:///{path}")
    try:
        ledger.ingest(chain("gen-2")["requested"], deadline=time.monotonic() - 1.0)
        assert ledger.get("gen-2") is not None
        with sqlite3.connect(path, isolation_level=None) as holder:
            holder.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with pytest.raises(DependencyUnavailable) as caught:
                ledger.ingest(chain("gen-3")["requested"], deadline=time.monotonic() - 1.0)
            assert time.monotonic() - started < BUSY_TIMEOUT_S / 2
            holder.execute("ROLLBACK")
        assert caught.value.message == BUSY and caught.value.retry_after == 1.0
    finally:
        ledger.close()


def test_a_ledger_migrated_before_0008_is_migrated_on_open(path: Path) -> None:
    """Opening reads the versions applied without a lock; one pending is applied under it."""
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM ledger_migrations WHERE version = 8")
        conn.execute("ALTER TABLE generations DROP COLUMN request_source")
        conn.execute("ALTER TABLE generations DROP COLUMN request_id")
    ledger = open_ledger(f"sqlite:///{path}")
    try:
        with ledger.statement() as db:
            versions = db.query("SELECT version FROM ledger_migrations ORDER BY version", {})
        assert [row["version"] for row in versions] == [m.version for m in migrations("sqlite")]
    finally:
        ledger.close()
