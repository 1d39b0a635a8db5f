"""Ledger benchmarks on a throwaway PostgreSQL 15 (``.ci/postgres``, default durability).

    python benchmarks/ledger.py [--generations 100000] [--events 4000] [--threads 4] [--rounds 3]

- ingest: events/s through ``Ledger.ingest`` (event row + generation upsert + webhook check,
  one transaction each) from ``--threads`` threads, against the floor of the same work: a bare
  ``INSERT … ON CONFLICT DO NOTHING`` of the event alone, one transaction each. Target ≥ 500/s
  on two cores.
- get: ``Ledger.get`` (the generation and its timeline) with ``--generations`` rows stored,
  against ``SELECT 1`` on the same pool: the round-trip floor. Target p50 ≤ 5 ms.

Rounds are interleaved (baseline, ours, baseline, ours, …); min and median are printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' event factory: one description of a generation

from imagegen.ledger import LedgerEvent, open_ledger  # noqa: E402
from imagegen.ledger.postgres import PostgresLedger  # noqa: E402
from tests.ledger.chain import chain  # noqa: E402


def _rate(
    work: Callable[[list[LedgerEvent]], None], events: list[LedgerEvent], threads: int
) -> float:
    chunks = [events[i::threads] for i in range(threads)]
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


def bench_ingest(ledger: PostgresLedger, events: int, threads: int, rounds: int) -> None:
    def bare(batch: list[LedgerEvent]) -> None:
        for event in batch:
            with ledger.transaction() as db:
                db.run(
                    "INSERT INTO bench_events (source, id, data) VALUES (:source, :id, :data) "
                    "ON CONFLICT (source, id) DO NOTHING",
                    {"source": event.source, "id": event.id, "data": event.data},
                )

    def ours(batch: list[LedgerEvent]) -> None:
        for event in batch:
            ledger.ingest(event)

    with ledger.transaction() as db:
        db.run(
            "CREATE TABLE IF NOT EXISTS bench_events (source TEXT, id TEXT, data JSONB, "
            "UNIQUE (source, id))",
            {},
        )
    base, mine = [], []
    for _ in range(rounds):
        base.append(_rate(bare, _events(events), threads))
        mine.append(_rate(ours, _events(events), threads))
    print(
        f"ingest events/s   bare insert min {min(base):7.0f} median {statistics.median(base):7.0f}"
        f"   ledger min {min(mine):7.0f} median {statistics.median(mine):7.0f}"
        f"   ledger/bare x{statistics.median(mine) / statistics.median(base):.2f}"
    )


def fill(ledger: PostgresLedger, generations: int) -> list[str]:
    """``generations`` persisted generations with four events each, written in bulk."""
    with ledger.transaction() as db:
        db.run(
            "INSERT INTO generations (generation_id, status, status_rank, created_at, updated_at,"
            " requested_at, enhanced_at, rendered_at, persisted_at, prompt, seed, model, width,"
            " height, keys, urls, url, sha256) "
            "SELECT 'bench-' || n, 'persisted', 4, t, t, t, t + interval '1 s', t + interval '4 s',"
            " t + interval '6 s', 'a lantern ' || n, n, 'tiny', 256, 256,"
            " jsonb_build_object('image', 'k/' || n || '.png'),"
            " jsonb_build_object('image', 'https://img/' || n), 'https://img/' || n,"
            " md5(n::text) || md5(n::text) "
            "FROM (SELECT n, now() - n * interval '1 s' AS t"
            " FROM generate_series(1, :count) AS n) AS s",
            {"count": generations},
        )
        db.run(
            "INSERT INTO ledger_events (source, id, type, subject, generation_id, time,"
            " recorded_at, data) "
            "SELECT '/imagegen/' || stage, 'bench-' || n || '-' || stage,"
            " 'dev.orchestr8.imagegen.' || stage, 'bench-' || n, 'bench-' || n,"
            " now() - n * interval '1 s' + k * interval '1 s', now(), '{}'::jsonb "
            "FROM generate_series(1, :count) AS n, (VALUES (0, 'generation.requested'),"
            " (1, 'prompt.enhanced'), (4, 'image.rendered'), (6, 'image.persisted'))"
            " AS stages(k, stage)",
            {"count": generations},
        )
        db.run("ANALYZE", {})
    return [f"bench-{n}" for n in range(1, generations + 1)]


def bench_get(ledger: PostgresLedger, ids: list[str], rounds: int, samples: int = 2000) -> None:
    rng = random.Random(7)

    def timed(fn: Callable[[str], object]) -> list[float]:
        out = []
        for gid in rng.sample(ids, samples):
            started = time.perf_counter()
            fn(gid)
            out.append((time.perf_counter() - started) * 1000)
        return out

    def select_one(_: str) -> object:
        with ledger.transaction() as db:
            return db.query("SELECT 1 AS one", {})

    def get(gid: str) -> object:
        found = ledger.get(gid)
        assert found is not None and len(found.timeline) == 4
        return found

    base_p50, mine_p50, mine_p95 = [], [], []
    for _ in range(rounds):
        base_p50.append(statistics.median(timed(select_one)))
        mine = timed(get)
        mine_p50.append(statistics.median(mine))
        mine_p95.append(statistics.quantiles(mine, n=20)[-1])
    print(
        f"get ms ({len(ids)} generations)   SELECT 1 p50 min {min(base_p50):.2f} "
        f"median {statistics.median(base_p50):.2f}   get p50 min {min(mine_p50):.2f} "
        f"median {statistics.median(mine_p50):.2f}  p95 median {statistics.median(mine_p95):.2f}"
        f"   get/SELECT 1 x{statistics.median(mine_p50) / statistics.median(base_p50):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generations", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.gettempdir()) / f"imagegen-bench-pg-{uuid.uuid4().hex[:8]}"
    script = str(ROOT / ".ci" / "postgres")
    url = subprocess.run(
        [script, "start", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        ledger = open_ledger(url)
        assert isinstance(ledger, PostgresLedger)
        bench_ingest(ledger, args.events, args.threads, args.rounds)
        bench_get(ledger, fill(ledger, args.generations), args.rounds)
        ledger.close()
    finally:
        subprocess.run([script, "stop", str(folder)], check=False)


if __name__ == "__main__":
    main()
