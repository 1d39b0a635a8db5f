"""The PostgreSQL ledger across a restart of its server: clients cut off, then back."""

from __future__ import annotations

import logging.handlers
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.ledger._sql import BUSY
from imagegen.ledger.postgres import PostgresLedger
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain

SCRIPT = str(ROOT / ".ci" / "postgres")


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A PostgreSQL server of this test's own (the session's is shared): its URL and folder."""
    folder = Path(f"/tmp/imagegen-pg-{uuid.uuid4().hex[:12]}")
    started = subprocess.run(
        [SCRIPT, "start", str(folder), "--", "fsync=off"], capture_output=True, text=True
    )
    if started.returncode:
        pytest.fail(f"could not start PostgreSQL: {started.stderr.strip()}")
    try:
        yield started.stdout.strip(), folder
    finally:
        subprocess.run([SCRIPT, "stop", str(folder)], check=False)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_fails_one_request_not_one_per_pooled_connection(
    server: tuple[str, Path], mode: str
) -> None:
    """The restart cuts every pooled connection. The first request to draw one fails,
    retryable (Knative redelivers it), and the pool's other connections are checked and
    replaced then, so the requests after it find live ones."""
    url, folder = server
    ledger = PostgresLedger(url, min_size=4, max_size=4)
    try:
        events = [chain(f"gen-{n}")["requested"] for n in range(8)]
        ledger.ingest(events[0])
        subprocess.run([SCRIPT, "restart", str(folder), mode], check=True)
        failed = 0
        for event in events[1:]:
            try:
                ledger.ingest(event)
            except DependencyUnavailable as exc:
                assert exc.retryable and "unavailable" in exc.message
                failed += 1
                ledger.ingest(event)  # the redelivery
        assert failed <= 1
        assert [g.generation_id for g in ledger.history(limit=10).items] == [
            f"gen-{n}" for n in range(7, -1, -1)
        ]
    finally:
        ledger.close()


def test_an_outage_fails_each_request_in_a_second_and_ends_with_the_next_request(
    server: tuple[str, Path],
) -> None:
    """While the server is down, a request does not wait the pool's whole timeout for a
    connection that cannot come: it fails retryable within a second or so. The first request
    after the server is back is served, not one after the pool's own reconnection backoff
    (which doubles up to minutes)."""
    url, folder = server
    ledger = PostgresLedger(url, min_size=2, max_size=4, timeout=30)
    events = [chain(f"gen-{n}")["requested"] for n in range(8)]
    try:
        ledger.ingest(events[0])
        subprocess.run([SCRIPT, "down", str(folder)], check=True)
        for event in events[1:5]:
            started = time.monotonic()
            with pytest.raises(DependencyUnavailable) as refused:
                ledger.ingest(event)
            assert time.monotonic() - started < 5, "waited for the pool's timeout"
            assert refused.value.retryable
            assert ledger.down()
        time.sleep(3)  # past the pool's own retries: a request must make it try again
        subprocess.run([SCRIPT, "up", str(folder)], check=True)
        for event in events[1:]:
            ledger.ingest(event)
        assert not ledger.down()
        assert [g.generation_id for g in ledger.history(limit=10).items] == [
            f"gen-{n}" for n in range(7, -1, -1)
        ]
    finally:
        ledger.close()


def test_a_busy_pool_is_not_a_server_down(server: tuple[str, Path]) -> None:
    """Every connection in use: a request waits the pool's timeout, and the server is not
    taken as down for it."""
    url, _ = server
    ledger = PostgresLedger(url, min_size=1, max_size=1, timeout=0.5)
    try:
        with ledger.statement(), pytest.raises(DependencyUnavailable):
            ledger.ingest(chain("gen-busy")["requested"])
        assert not ledger.down()
        ledger.ingest(chain("gen-busy")["requested"])
        assert ledger.get("gen-busy") is not None
    finally:
        ledger.close()


def test_a_connection_that_answers_ends_the_outage(server: tuple[str, Path]) -> None:
    """One connection cut (by a proxy's idle timeout, say) while the server is fine: the pool
    may not replace it, so a pooled connection that answers ends the outage too, or every
    request after would wait a second, not the pool's timeout, for a busy pool."""
    url, _ = server
    ledger = PostgresLedger(url, min_size=1, max_size=1, timeout=5)
    try:
        ledger.ingest(chain("gen-up")["requested"])
        ledger._refused = time.monotonic()  # as when a connection was found cut
        assert ledger.down()
        assert ledger.get("gen-up") is not None
        assert not ledger.down()
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SELECT '{{{{{{{1}}}}}}}'::int[] AS v", "54000"),  # ProgramLimitExceeded
        ("SELECT 1 / (SELECT 0) AS v", "22012"),  # a DataError
    ],
)
def test_a_value_postgresql_refuses_is_a_400_that_quotes_nothing(
    ledger_url: str, sql: str, sqlstate: str
) -> None:
    """A limit or a value the server refuses (an index row too large, a value out of range) is
    the same at every redelivery: a final 400, not "the database is unavailable" (a 503
    retried for ever); the server's text, which may quote the value, is logged, not answered."""
    ledger = PostgresLedger(ledger_url)
    try:
        with pytest.raises(InvalidRequest) as caught, ledger.statement() as db:
            db.query(sql, {})
        assert not caught.value.retryable and caught.value.status == 400
        assert caught.value.fields == ["event"]
        assert sqlstate in caught.value.message
        assert "dimensions" not in caught.value.message and "zero" not in caught.value.message
        assert ledger.get("gen-none") is None  # the connection is still usable
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_deadlock_is_a_503_in_general_terms_its_details_logged(
    ledger_url: str,
    serve_ledger: Callable[..., InProcessFunction],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's text spans lines and names other sessions' processes and rows: logged with
    its SQLSTATE, not answered. The answer says the write met another, to be retried."""
    import psycopg

    # The function's logging replaces the root's handlers (pytest's among them): listened to
    # where the ledger logs.
    logged = logging.handlers.BufferingHandler(capacity=1000)
    monkeypatch.setattr(logging.getLogger("imagegen.ledger.postgres"), "handlers", [logged])
    function = serve_ledger()
    events = chain("gen-dl")
    assert function.post("/", **binary(events["requested"])).status_code == 202
    enhanced = events["enhanced"]
    with psycopg.connect(ledger_url) as other:
        # The ledger's session detects the deadlock (after its deadlock_timeout, 1 s), so it
        # is the one whose transaction is ended.
        other.execute("SET deadlock_timeout = '60s'")
        other.execute("SELECT 1 FROM generations WHERE generation_id = 'gen-dl' FOR UPDATE")
        pid = other.info.backend_pid
        answers: list[Any] = []
        recording = threading.Thread(
            target=lambda: answers.append(function.post("/", **binary(enhanced)))
        )
        recording.start()  # inserts the event, then waits for the row
        with psycopg.connect(ledger_url, autocommit=True) as watch:
            deadline = time.monotonic() + 10
            while not watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)
            ).fetchall():
                assert time.monotonic() < deadline, "the ledger never waited for the row"
                time.sleep(0.01)  # polling the server's view of the wait
        # The same event: waits for the ledger's insert, which waits for this row lock.
        other.execute(
            "INSERT INTO ledger_events (source, id, type, generation_id, time, recorded_at, "
            "data) VALUES (%s, %s, %s, 'gen-dl', now(), now(), '{}')",
            (enhanced.source, enhanced.id, enhanced.type),
        )
        other.rollback()
        recording.join(timeout=30)
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["message"] == BUSY and answer.json()["retryable"] is True
    assert "DETAIL" not in answer.text and "Process" not in answer.text
    said = [r.getMessage() for r in logged.buffer if "SQLSTATE 40P01" in r.getMessage()]
    assert said and "deadlock detected" in said[0] and "DETAIL" in said[0]
