"""At-least-once delivery to several replicas at once: each event once, the right final status."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from imagegen.ledger import Ledger, LedgerEvent
from tests.ledger.chain import chain


def test_100_generations_delivered_twice_out_of_order_to_two_replicas(
    open_test_ledger: Callable[[], Ledger],
) -> None:
    replicas = [open_test_ledger(), open_test_ledger()]
    rng = random.Random(14)
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
    start = threading.Barrier(8)

    def deliver(worker: int) -> list[bool]:
        start.wait()
        replica = replicas[worker % 2]
        return [replica.ingest(event).duplicate for event in deliveries[worker::8]]

    with ThreadPoolExecutor(8) as pool:
        duplicates = [d for flags in pool.map(deliver, range(8)) for d in flags]

    assert duplicates.count(False) == 400 and duplicates.count(True) == 400
    with replicas[0].transaction() as db:
        (events,) = db.query("SELECT count(*) AS n FROM ledger_events", {})
        (rows,) = db.query("SELECT count(*) AS n FROM generations", {})
    assert (events["n"], rows["n"]) == (400, 100)
    statuses = {}
    cursor = None
    while True:
        page = replicas[1].history(limit=40, cursor=cursor)
        statuses.update({g.generation_id: g.status for g in page.items})
        if not (cursor := page.next_cursor):
            break
    assert statuses == expected
    assert all(len(replicas[0].generation_events(gid)) == 4 for gid in expected)
