"""Ledger benchmarks on a throwaway PostgreSQL 15 (``.ci/postgres``, default durability).

    python benchmarks/ledger.py [--generations 100000] [--events 4000] [--threads 8] [--rounds 3]

- ingest: events/s through ``Ledger.ingest`` (the event row and the generation's upsert as one
  statement, one round trip) from ``--threads`` threads, against two floors: a bare
  ``INSERT … ON CONFLICT DO NOTHING`` of the event alone, one transaction each, and the ingest
  this replaced (BEGIN, insert the event, upsert the row, COMMIT: four round trips). Target
  ≥ 500/s on two cores (the ledger's median round).
- get: ``Ledger.get`` (the generation and its timeline) with ``--generations`` generations
  (and four times as many events) loaded with ``COPY``, against ``SELECT 1`` on the same pool:
  the round-trip floor; and ``GET /generations/{id}`` on the ledger function served in this
  process (functions-framework's app over WSGI: routing, authentication, JSON, no socket).
  Each arm reads 2,000 generations a round, each once (all of them where fewer are stored).
  Target p50 ≤ 5 ms (the median round's p50) for both.

Each part runs its three arms one after another in every round, each round starting one arm
further on (A B C, B C A, C A B, …); min and median over the rounds are printed, and each
target with ``met`` or ``NOT MET`` beside the figure it judges.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# _harness puts the repository on the path: the tests' event factory describes a generation.
from _cli import at_least, count, exit_on_sigterm, output_of
from _harness import ROOT, absolute_verdict, rotated

from imagegen.ledger import LedgerEvent, open_ledger
from imagegen.ledger._sql import SqlLedger
from imagegen.ledger.postgres import PostgresLedger
from tests.ledger.chain import chain

INGEST_TARGET = 500.0
"""Events/s through ``Ledger.ingest``, the median round, at least."""
GET_TARGET_MS = 5.0
"""``Ledger.get`` and ``GET /generations/{id}``: their p50, the median round, at most."""
GET_SAMPLES = 2000
"""Generations each arm of a get round reads, each once (all of them where fewer are stored)."""


def _rate(
    work: Callable[[list[LedgerEvent]], None], events: list[LedgerEvent], threads: int
) -> float:
    # Each thread takes whole generations, in order: a generation's events arrive seconds
    # apart in a cluster, never all at once (a row lock would then serialise them).
    size = -(-len(events) // threads // 4) * 4
    chunks = [events[i : i + size] for i in range(0, len(events), size)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))
    return len(events) / (time.perf_counter() - started)


def _events(count: int) -> list[LedgerEvent]:
    out: list[LedgerEvent] = []
    for _ in range(count // 4):
        events = chain(uuid.uuid4().hex)
        out += [events[n] for n in ("requested", "enhanced", "rendered", "persisted")]
    return out


class TransactionLedger(PostgresLedger):
    """The ingest this replaced: BEGIN, insert the event, upsert the row, COMMIT (4 trips)."""

    _record = SqlLedger._record


def bench_ingest(url: str, events: int, threads: int, rounds: int) -> None:
    ledger = PostgresLedger(url)
    before = TransactionLedger(url)

    def bare(batch: list[LedgerEvent]) -> None:
        for event in batch:
            with ledger.statement() as db:
                db.run(
                    "INSERT INTO bench_events (source, id, data) VALUES (:source, :id, :data) "
                    "ON CONFLICT (source, id) DO NOTHING",
                    {"source": event.source, "id": event.id, "data": event.data},
                )

    def transaction(batch: list[LedgerEvent]) -> None:
        for event in batch:
            before.ingest(event)

    def ours(batch: list[LedgerEvent]) -> None:
        for event in batch:
            ledger.ingest(event)

    with ledger.transaction() as db:
        db.run(
            "CREATE TABLE IF NOT EXISTS bench_events (source TEXT, id TEXT, data JSONB, "
            "UNIQUE (source, id))",
            {},
        )
    rates: dict[str, list[float]] = {"bare insert": [], "transaction": [], "ledger": []}
    arms = [("bare insert", bare), ("transaction", transaction), ("ledger", ours)]
    for round_ in range(rounds):
        # Interleaved, and each round starts with another arm: drift hits every arm alike.
        for name, work in rotated(arms, round_):
            rates[name].append(_rate(work, _events(events), threads))
    ledger.close()
    before.close()
    for line in ingest_report(rates):
        print(line)


def ingest_report(rates: dict[str, list[float]]) -> list[str]:
    """The ingest lines: each arm's min and median, the ratios of medians, the target."""
    median = {name: statistics.median(r) for name, r in rates.items()}
    lines = ["ingest events/s (min / median):"]
    lines += [f"  {name:<12} {min(r):6.0f} / {median[name]:6.0f}" for name, r in rates.items()]
    lines.append(
        f"  ledger x{median['ledger'] / median['transaction']:.2f} the transaction,"
        f" x{median['ledger'] / median['bare insert']:.2f} the bare insert (medians);"
        f" ledger median {median['ledger']:.0f}/s:"
        f" {absolute_verdict(median['ledger'], INGEST_TARGET, at_most=False, unit='events/s')}"
    )
    return lines


def fill(url: str, generations: int) -> list[str]:
    """``generations`` persisted generations with four events each, loaded with ``COPY``."""
    import psycopg
    from psycopg.types.json import Jsonb

    start = datetime.now(UTC) - timedelta(seconds=generations)
    offsets = (
        (0, "generation.requested", "requested"),
        (1, "prompt.enhanced", "enhance"),
        (4, "image.rendered", "render"),
        (6, "image.persisted", "persist"),
    )
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY generations (generation_id, status, status_rank, created_at, updated_at,"
            " requested_at, enhanced_at, rendered_at, persisted_at, prompt, seed, model, width,"
            " height, keys, urls, url, sha256) FROM STDIN"
        ) as copy:
            for n in range(generations):
                t = start + timedelta(seconds=n)
                url_of = f"https://img/{n}"
                copy.write_row(
                    (f"bench-{n}", "persisted", 4, t, t, t, t + timedelta(seconds=1),
                     t + timedelta(seconds=4), t + timedelta(seconds=6), f"a lantern {n}", n,
                     "tiny", 256, 256, Jsonb({"image": f"k/{n}.png"}), Jsonb({"image": url_of}),
                     url_of, f"{n:064x}")
                )  # fmt: skip
        with cur.copy(
            "COPY ledger_events (source, id, type, subject, generation_id, time, recorded_at,"
            " data) FROM STDIN"
        ) as copy:
            for n in range(generations):
                t = start + timedelta(seconds=n)
                for offset, kind, stage in offsets:
                    copy.write_row(
                        (f"/imagegen/{stage}", f"bench-{n}-{stage}",
                         f"dev.orchestr8.imagegen.{kind}", f"bench-{n}", f"bench-{n}",
                         t + timedelta(seconds=offset), t, Jsonb({}))
                    )  # fmt: skip
        cur.execute("ANALYZE")
    return [f"bench-{n}" for n in range(generations)]


def _served(url: str) -> Any:
    """The ledger function in this process (functions-framework's app, WSGI): an HTTP client."""
    import os

    import functions_framework
    import httpx

    os.environ["IMAGEGEN_LEDGER_URL"] = url
    app = functions_framework.create_app("ledger", str(ROOT / "functions" / "ledger.py"))
    return httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://ledger")


def bench_get(
    ledger: PostgresLedger, url: str, ids: list[str], rounds: int, samples: int = GET_SAMPLES
) -> None:
    samples = min(samples, len(ids))
    rng = random.Random(7)
    client = _served(url)

    def timed(fn: Callable[[str], object]) -> list[float]:
        out = []
        for gid in rng.sample(ids, samples):
            started = time.perf_counter()
            fn(gid)
            out.append((time.perf_counter() - started) * 1000)
        return out

    def select_one(_: str) -> object:
        with ledger.statement() as db:  # one round trip: the floor
            return db.query("SELECT 1 AS one", {})

    def get(gid: str) -> object:
        found = ledger.get(gid)
        assert found is not None and len(found.timeline) == 4
        return found

    def http_get(gid: str) -> object:
        reply = client.get(f"/generations/{gid}")
        assert reply.status_code == 200 and len(reply.json()["timeline"]) == 4
        return reply

    arms = [("SELECT 1", select_one), ("Ledger.get", get), ("GET /generations/{id}", http_get)]
    p50: dict[str, list[float]] = {name: [] for name, _ in arms}
    p95: dict[str, list[float]] = {name: [] for name, _ in arms}
    for round_ in range(rounds):
        for name, fn in rotated(arms, round_):
            times = timed(fn)
            p50[name].append(statistics.median(times))
            p95[name].append(statistics.quantiles(times, n=20)[-1])
    for line in get_report(p50, p95, len(ids)):
        print(line)


def get_report(p50: dict[str, list[float]], p95: dict[str, list[float]], stored: int) -> list[str]:
    """The get lines: each arm's p50 (min / median over the rounds), p95, ratio, target."""
    floor = statistics.median(p50["SELECT 1"])
    lines = [f"get ms, {stored} generations stored (p50 min / median, p95 median):"]
    for name, rounds in p50.items():
        median = statistics.median(rounds)
        line = (
            f"  {name:<22} p50 {min(rounds):.2f} / {median:.2f}"
            f"  p95 {statistics.median(p95[name]):.2f}  x{median / floor:.2f} the SELECT 1"
        )
        if name != "SELECT 1":  # the floor: no target
            line += (
                f"; p50 median {absolute_verdict(median, GET_TARGET_MS, at_most=True, unit='ms')}"
            )
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # Two at least: a round's p95 needs two reads (statistics.quantiles).
    parser.add_argument("--generations", type=at_least(2), default=100_000)
    # One generation's four events at least: the events come in whole generations.
    parser.add_argument("--events", type=at_least(4), default=4000)
    # Concurrent deliveries, as a ledger replica takes them (containerConcurrency 50).
    parser.add_argument("--threads", type=count, default=8)
    parser.add_argument("--rounds", type=count, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.gettempdir()) / f"imagegen-bench-pg-{uuid.uuid4().hex[:8]}"
    script = str(ROOT / ".ci" / "postgres")
    url = output_of([script, "start", str(folder)], what=".ci/postgres start").strip()
    try:
        bench_ingest(url, args.events, args.threads, args.rounds)
        ledger = open_ledger(url)
        assert isinstance(ledger, PostgresLedger)
        bench_get(ledger, url, fill(url, args.generations), args.rounds)
        ledger.close()
    finally:
        subprocess.run([script, "stop", str(folder)], check=False)


if __name__ == "__main__":
    exit_on_sigterm()  # a timeout's SIGTERM stops the PostgreSQL server
    main()
