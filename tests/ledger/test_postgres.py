"""The PostgreSQL ledger across a restart of its server: clients cut off, then back."""

from __future__ import annotations

import logging.handlers
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.ledger._sql import BUSY
from imagegen.ledger._statements import PRUNE
from imagegen.ledger.postgres import _MIGRATION_LOCK, RECONNECT_FOR, PostgresLedger
from tests.conftest import ROOT
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain

SCRIPT = str(ROOT / ".ci" / "postgres")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A PostgreSQL server of this test's own (the session's is shared): its URL and folder.
    Indirectly parametrised, the server's own options (``max_connections=3``)."""
    folder = Path(f"/tmp/imagegen-pg-{uuid.uuid4().hex[:12]}")
    options = getattr(request, "param", ())
    started = subprocess.run(
        [SCRIPT, "start", str(folder), "--", "fsync=off", *options], capture_output=True, text=True
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


def _release_later(conn: Any, after: float) -> threading.Timer:
    """``conn``'s transaction rolled back (its locks released) ``after`` seconds from now: a
    test whose ledger waited for them, as it would without its own limits, ends."""
    timer = threading.Timer(after, conn.rollback)
    timer.start()
    return timer


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_table_locked_elsewhere_is_a_503_retry_after_1_within_seconds(
    ledger_url: str, serve_ledger: Callable[..., InProcessFunction]
) -> None:
    """Another session holds a lock the event's write needs (a long migration, a manual
    LOCK TABLE): the ledger's lock_timeout ends the wait in seconds, answered as a write that
    met another, instead of the event waiting out the stage's 30 s (its statement running on
    after the answer, holding a worker thread and a pooled connection)."""
    import psycopg

    function = serve_ledger()
    events = chain("gen-lk")
    assert function.post("/", **binary(events["requested"])).status_code == 202
    with psycopg.connect(ledger_url) as other:
        other.execute("LOCK TABLE ledger_events IN ACCESS EXCLUSIVE MODE")
        released = _release_later(other, 15)
        started = time.monotonic()
        answer = function.post("/", **binary(events["enhanced"]))
        waited = time.monotonic() - started
        released.cancel()
        other.rollback()
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["message"] == BUSY
    assert waited < 10
    assert function.post("/", **binary(events["enhanced"])).status_code == 202  # redelivered


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_statement_past_its_time_limit_is_retryable_and_the_connection_kept(
    ledger_url: str,
) -> None:
    """A statement that runs past statement_timeout is cancelled by the server (SQLSTATE
    57014): retryable, said in general terms, and the connection serves the next request."""
    ledger = PostgresLedger(ledger_url, min_size=1, max_size=1, statement_timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as caught, ledger.statement() as db:
            db.query("SELECT pg_sleep(3) AS slept", {})
        assert time.monotonic() - started < 2
        assert caught.value.retryable and caught.value.retry_after == 1
        assert "57014" in caught.value.message and "cancel" not in caught.value.message
        assert ledger.get("gen-none") is None
        assert not ledger.down()
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_the_timeouts_the_url_sets_are_kept(ledger_url: str) -> None:
    """The ledger's limits on every pooled connection, unless the URL's options set their own."""

    def limits(url: str) -> tuple[str, str]:
        ledger = PostgresLedger(url, min_size=1, max_size=1)
        try:
            with ledger.statement() as db:
                [lock] = db.query("SHOW lock_timeout", {})
                [statement] = db.query("SHOW statement_timeout", {})
            return lock["lock_timeout"], statement["statement_timeout"]
        finally:
            ledger.close()

    assert limits(ledger_url) == ("2s", "5s")
    own = quote("-c lock_timeout=1234 -c statement_timeout=4321 ")
    assert limits(ledger_url.replace("options=", f"options={own}", 1)) == ("1234ms", "4321ms")
    only = quote("-c statement_timeout=0 ")
    assert limits(ledger_url.replace("options=", f"options={only}", 1)) == ("2s", "0")


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_migration_waits_for_another_replicas_past_the_lock_timeout(ledger_url: str) -> None:
    """Replicas starting together wait for each other's migrations (an index built on a large
    table takes minutes): the migration runs without the requests' limits."""
    import psycopg

    with psycopg.connect(ledger_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        released = _release_later(other, 1.0)
        try:
            ledger = PostgresLedger(ledger_url, lock_timeout=0.2, statement_timeout=0.3)
        finally:
            released.join()
    try:
        assert ledger.get("gen-none") is None  # migrated
    finally:
        ledger.close()


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_prune_runs_past_the_statement_timeout(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune deletes in bulk (a first one, months of history), from a command or a job that
    answers no request: not cut at the requests' statement_timeout."""
    ledger = PostgresLedger(ledger_url, statement_timeout=0.2)
    try:
        monkeypatch.setitem(PRUNE, "slow", "SELECT pg_sleep(0.5)")
        assert ledger.prune(timedelta(days=1)) == {
            "events": 0,
            "generations": 0,
            "deliveries": 0,
            "slow": 1,
        }
    finally:
        ledger.close()


@pytest.mark.parametrize(
    "server", [("max_connections=3", "superuser_reserved_connections=0")], indirect=True
)
def test_a_first_connection_refused_says_why_in_general_terms(server: tuple[str, Path]) -> None:
    """Every connection slot taken: the opening fails as a server out of reach
    (``Retry-After: 2``), naming the cause and its SQLSTATE, not the pool's "initialization
    incomplete" nor the server's text."""
    import psycopg

    url, _ = server
    taken = []
    with pytest.raises(psycopg.OperationalError):
        while len(taken) < 10:
            taken.append(psycopg.connect(url, autocommit=True))
    try:
        started = time.monotonic()
        with pytest.raises(DependencyUnavailable) as caught:
            PostgresLedger(url, timeout=1)
        assert time.monotonic() - started < 5
    finally:
        for conn in taken:
            conn.close()
    said = caught.value.message
    assert "too many connections" in said and "SQLSTATE 53300" in said, said
    assert "sorry" not in said and "initialization" not in said and "127.0.0.1" not in said
    assert caught.value.retryable and caught.value.retry_after == RECONNECT_FOR


def test_a_first_connection_to_a_stopped_server_says_it_is_refused(
    server: tuple[str, Path],
) -> None:
    url, folder = server
    subprocess.run([SCRIPT, "down", str(folder)], check=True)
    with pytest.raises(DependencyUnavailable) as caught:
        PostgresLedger(url, timeout=1)
    said = caught.value.message
    assert "connection refused" in said and "initialization" not in said, said
    assert "127.0.0.1" not in said and url.rsplit(":", 1)[1].split("/")[0] not in said
    assert caught.value.retry_after == RECONNECT_FOR


def test_a_connection_cut_while_its_statement_runs_is_a_server_out_of_reach(
    server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server cuts every connection (a restart, a failover; here pg_terminate_backend)
    while a statement runs, and takes new ones at once: the pool replaces the cut connection
    in the background, and may have done so by the time the answer is made (under load, it
    often has). The statement's connection was cut all the same: the answer is the server
    out of reach (``Retry-After: 2``), not a statement it could not answer (``10``)."""
    import psycopg

    url, _ = server
    ledger = PostgresLedger(url, min_size=2, max_size=2)

    class Reconnected(logging.Handler):
        """Holds the failed statement's answer until the pool has connected again."""

        def emit(self, record: logging.LogRecord) -> None:
            deadline = time.monotonic() + 5
            while ledger.down() and time.monotonic() < deadline:
                time.sleep(0.01)  # polling the pool's background reconnection

    monkeypatch.setattr(logging.getLogger("imagegen.ledger.postgres"), "handlers", [Reconnected()])
    cut: list[int] = []

    def cut_all() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            deadline = time.monotonic() + 10
            while not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            ).fetchall():
                assert time.monotonic() < deadline
                time.sleep(0.01)  # polling the server's view of the statement
            rows = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchall()
            cut.append(len(rows))

    try:
        ledger._pool.wait(timeout=5)  # both connections open: both are cut
        cutting = threading.Thread(target=cut_all)
        cutting.start()
        with pytest.raises(DependencyUnavailable) as caught, ledger.statement() as db:
            db.query("SELECT pg_sleep(10) AS slept", {})
        cutting.join()
        assert cut == [2]
        assert caught.value.message == "the ledger database is unavailable: it cannot be reached"
        assert caught.value.retry_after == RECONNECT_FOR
        ledger.ingest(chain("gen-cut")["requested"])  # the redelivery
    finally:
        ledger.close()
