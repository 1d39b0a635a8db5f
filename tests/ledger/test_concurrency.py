"""At-least-once delivery to several replicas at once: each event once, the right final status.

The same deliveries twice: straight into two ledger instances (two replicas' pools on one
database), and as HTTP requests to the served ledger function from eight threads.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagegen.ledger import Ledger, LedgerEvent, open_ledger
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary, chain
from tests.ledger.conftest import schema_url

WORKERS = 8


def _deliveries(seed: int) -> tuple[list[LedgerEvent], dict[str, str]]:
    """100 generations' events, each twice, a third out of order, all shuffled; final statuses."""
    rng = random.Random(seed)
    deliveries: list[LedgerEvent] = []
    expected: dict[str, str] = {}
    for n in range(100):
        events = chain(f"gen-{n:03d}")
        last = "failed" if n % 10 == 0 else "persisted"
        expected[f"gen-{n:03d}"] = last
        names = ["requested", "enhanced", "rendered", last]
        if n % 3 == 0:
            rng.shuffle(names)  # a third arrive out of order
        deliveries += [events[name] for name in names] * 2
    rng.shuffle(deliveries)
    return deliveries, expected


def _check(ledger: Ledger, expected: dict[str, str]) -> None:
    with ledger.transaction() as db:
        (events,) = db.query("SELECT count(*) AS n FROM ledger_events", {})
        (rows,) = db.query("SELECT count(*) AS n FROM generations", {})
    assert (events["n"], rows["n"]) == (400, 100)
    statuses = {}
    cursor = None
    while True:
        page = ledger.history(limit=40, cursor=cursor)
        statuses.update({g.generation_id: g.status for g in page.items})
        if not (cursor := page.next_cursor):
            break
    assert statuses == expected
    assert all(len(ledger.generation_events(gid)) == 4 for gid in expected)


def test_100_generations_delivered_twice_out_of_order_to_two_replicas(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    replicas = [open_test_ledger(), open_test_ledger()]
    deliveries, expected = _deliveries(14)
    start = threading.Barrier(WORKERS)

    def deliver(worker: int) -> list[bool]:
        start.wait()
        replica = replicas[worker % 2]
        return [replica.ingest(event).duplicate for event in deliveries[worker::WORKERS]]

    with ThreadPoolExecutor(WORKERS) as pool:
        duplicates = [d for flags in pool.map(deliver, range(WORKERS)) for d in flags]

    assert duplicates.count(False) == 400 and duplicates.count(True) == 400
    _check(replicas[1], expected)


@pytest.mark.slow
def test_100_generations_delivered_twice_out_of_order_to_the_served_function(
    function: InProcessFunction, open_test_ledger: Callable[[], Ledger]
) -> None:
    deliveries, expected = _deliveries(15)
    start = threading.Barrier(WORKERS)

    def deliver(worker: int) -> list[int]:
        start.wait()
        return [function.post("/", **binary(e)).status_code for e in deliveries[worker::WORKERS]]

    with ThreadPoolExecutor(WORKERS) as pool:
        statuses = [s for codes in pool.map(deliver, range(WORKERS)) for s in codes]

    # A redelivery is answered like the first delivery: 202, and nothing changes.
    assert statuses == [202] * 800
    _check(open_test_ledger(), expected)
    for gid, status in list(expected.items())[:5]:
        assert function.get(f"/generations/{gid}").json()["status"] == status


def test_connections_opening_a_new_sqlite_ledger_at_once_all_open(tmp_path: Path) -> None:
    """Each asks for WAL mode, which SQLite refuses a second asker without waiting."""
    from imagegen.ledger.sqlite import SqliteLedger

    def opened(path: Path) -> int:
        ledger = SqliteLedger(path)
        try:
            return len(list(ledger.events()))
        finally:
            ledger.close()

    with ThreadPoolExecutor(4) as pool:
        for round_ in range(60):
            path = tmp_path / f"ledger-{round_}.db"
            assert list(pool.map(opened, [path] * 4)) == [0] * 4


def test_a_failure_recorded_as_the_image_is_persisted_elsewhere_is_not_told(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    """Replica A records generation.failed and is paused (a preempted thread) before it writes
    the messages that event makes due; meanwhile replica B records image.persisted. The
    stored image outranks the failure: the caller hears "completed" and never "failed"."""
    a, b = open_test_ledger(), open_test_ledger()
    events = chain(
        "gen-race", webhook="https://hooks.example/x", webhook_events=["completed", "failed"]
    )
    for name in ("requested", "enhanced", "rendered"):
        b.ingest(events[name])
    enqueue = a._enqueue_webhooks  # type: ignore[attr-defined]
    enqueuing = threading.Event()

    def paused(*args: object) -> None:
        enqueuing.set()
        time.sleep(0.5)
        enqueue(*args)

    a._enqueue_webhooks = paused  # type: ignore[attr-defined]
    failing = threading.Thread(target=a.ingest, args=(events["failed"],))
    failing.start()
    assert enqueuing.wait(10)
    b.ingest(events["persisted"])
    failing.join()

    assert b.get("gen-race").status == "persisted"
    states = {kind: state["state"] for kind, state in b.delivery_states("gen-race").items()}
    assert states.get("failed", "cancelled") == "cancelled"
    assert [d.event for d in b.claim_deliveries(lease=60)] == ["completed"]


def test_a_replica_whose_clock_runs_ahead_does_not_claim_a_leased_message(
    postgres_url: str,
) -> None:
    """Leases are reckoned by the database server's clock, not each replica's: one an hour
    ahead would otherwise take a message another replica is sending, and send it twice."""
    import psycopg

    schema = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    a = open_ledger(schema_url(postgres_url, schema))
    b = open_ledger(schema_url(postgres_url, schema))
    try:
        events = chain("gen-clock", webhook="https://hooks.example/x", webhook_events=["started"])
        a.ingest(events["requested"])
        assert [d.event for d in a.claim_deliveries(lease=60)] == ["started"]
        b._now = lambda: datetime.now(UTC) + timedelta(hours=1)  # type: ignore[method-assign]
        assert b.claim_deliveries(lease=60) == []
    finally:
        a.close()
        b.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _request(gid: str, who: str) -> LedgerEvent:
    """A ``generation.requested`` naming ``gid`` from caller ``who``, with a webhook of its own."""
    return LedgerEvent(
        source=f"/caller/{who}",
        id=f"{who}-{gid}",
        type="dev.orchestr8.imagegen.generation.requested",
        subject=gid,
        time=datetime(2026, 6, 1, 12, tzinfo=UTC),
        data={
            "generation_id": gid,
            "prompt": f"prompt {who}",
            "webhook": f"https://h.example/{who}",
        },
    )


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_of_two_requests_recorded_at_once_replay_sends_the_one_the_row_took(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    """PostgreSQL draws an event's seq before its upsert waits for the row's lock: the request
    with the lower seq can reach the row second, and take nothing of it. Replay sends the one
    whose webhook the row took, not the lowest seq."""
    from imagegen.ledger._statements import RECORD, upsert_params
    from imagegen.ledger.fold import fold
    from imagegen.ledger.postgres import LOCK_ROW
    from imagegen.ledger.replay import replay_request

    a, b = open_test_ledger(), open_test_ledger()
    gid = "gen-race"
    a.ingest(chain(gid)["enhanced"])  # the row is there before either request
    first, second = _request(gid, "first"), _request(gid, "second")
    with b.transaction() as db:  # b: a replica recording `second`, its row lock taken first
        db.query(LOCK_ROW, {"gid": gid})
        [holder] = db.query("SELECT pg_backend_pid() AS pid", {})
        recording = threading.Thread(target=a.ingest, args=(first,))
        recording.start()
        deadline = time.monotonic() + 10
        with a.statement() as watch:  # until `first` (its seq drawn) waits for that lock
            while not watch.query(
                "SELECT 1 AS waiting FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))",
                {"pid": holder["pid"]},
            ):
                assert time.monotonic() < deadline, "the request never waited for the row"
                time.sleep(0.01)  # polling the server's view of the wait
        now = datetime.now(UTC)
        change = fold(second, now=now)
        assert change is not None
        recorded = {
            **second.model_dump(include={"source", "id", "type", "subject", "data"}),
            "generation_id": gid,
            "time": change.at,
            "time_attribute": second.time,
            "recorded_at": now,
            "received": None,
        }
        db.query(
            RECORD,
            {**recorded, **upsert_params(change, now, event=(second.source, second.id))},
        )
    recording.join(timeout=10)
    with a.statement() as db:
        order = db.query(
            "SELECT id FROM ledger_events WHERE type = :type ORDER BY seq", {"type": first.type}
        )
        [row] = db.query("SELECT webhook FROM generations WHERE generation_id = :gid", {"gid": gid})
    assert [r["id"] for r in order] == [first.id, second.id]  # `first` has the lower seq
    assert row["webhook"] == "https://h.example/second"  # but `second` reached the row first
    assert replay_request(a, gid).prompt == "prompt second"


def test_two_requests_delivered_at_once_to_two_replicas_leave_the_row_one_request(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    """Two callers' requests naming one generation, each recorded by its own replica at once:
    whichever is recorded first, the row's prompt, model and size are that request's, the one
    whose webhook it took and that replay sends."""
    from imagegen.ledger.replay import replay_request

    replicas = [open_test_ledger(), open_test_ledger()]
    sizes = {"first": 512, "second": 768}
    gids = [f"gen-both-{n:02d}" for n in range(40)]

    def deliver(gid: str) -> None:
        start = threading.Barrier(2)

        def record(who: str, replica: Ledger) -> None:
            request = _request(gid, who)
            data = {**request.data, "model": f"model-{who}", "width": sizes[who]}
            start.wait()
            replica.ingest(request.model_copy(update={"data": data}))

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(record, sizes, replicas))

    for gid in gids:
        deliver(gid)

    ledger = replicas[0]
    models: dict[str, str | None] = {}
    for gid in gids:
        found = ledger.get(gid)
        assert found is not None
        who = found.original_prompt.removeprefix("prompt ") if found.original_prompt else ""
        assert who in sizes, found.original_prompt
        assert (found.model, found.width) == (f"model-{who}", sizes[who])
        with ledger.statement() as db:
            [row] = db.query(
                "SELECT webhook FROM generations WHERE generation_id = :gid", {"gid": gid}
            )
        assert row["webhook"] == f"https://h.example/{who}"
        request = replay_request(ledger, gid)
        assert (request.prompt, request.model, request.width) == (
            found.original_prompt,
            found.model,
            found.width,
        )
        models[gid] = found.model
    for who in sizes:  # history's model filter finds each under the model its row shows
        listed = ledger.history(model=f"model-{who}", limit=100).items
        assert sorted(g.generation_id for g in listed) == sorted(
            gid for gid, model in models.items() if model == f"model-{who}"
        )


def test_an_invalid_and_a_valid_request_recorded_at_once_leave_the_row_the_valid_one(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    """A request enhance refuses and a valid one naming the same generation, each recorded by
    its own replica at once: whichever is recorded first, the row's prompt, model and size
    are the valid request's, the row names it, and replay sends it. The messages go where the
    first recorded said."""
    from imagegen.ledger.replay import replay_request

    replicas = [open_test_ledger(), open_test_ledger()]
    gids = [f"gen-mixed-{n:02d}" for n in range(40)]

    def deliver(gid: str) -> None:
        start = threading.Barrier(2)
        invalid = _request(gid, "invalid")
        invalid = invalid.model_copy(update={"data": {**invalid.data, "width": "wide"}})
        valid = _request(gid, "valid")
        valid = valid.model_copy(update={"data": {**valid.data, "model": "tiny", "width": 768}})

        def record(request: LedgerEvent, replica: Ledger) -> None:
            start.wait()
            replica.ingest(request)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(record, [invalid, valid], replicas))

    for gid in gids:
        deliver(gid)

    ledger = replicas[0]
    for gid in gids:
        found = ledger.get(gid)
        assert found is not None
        said = (found.original_prompt, found.model, found.width)
        assert said == ("prompt valid", "tiny", 768), gid
        with ledger.statement() as db:
            [row] = db.query(
                "SELECT webhook, request_id FROM generations WHERE generation_id = :gid",
                {"gid": gid},
            )
            sent_to = db.query(
                "SELECT url FROM webhook_deliveries WHERE generation_id = :gid", {"gid": gid}
            )
        assert row["request_id"] == f"valid-{gid}"
        assert row["webhook"] in ("https://h.example/invalid", "https://h.example/valid")
        assert [m["url"] for m in sent_to] == [row["webhook"]]  # its started, to one receiver
        request = replay_request(ledger, gid)
        assert (request.prompt, request.model, request.width) == said
    listed = ledger.history(model="tiny", limit=100).items
    assert sorted(g.generation_id for g in listed) == sorted(gids)
