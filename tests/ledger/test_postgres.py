"""The PostgreSQL ledger across a restart of its server: clients cut off, then back."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.errors import DependencyUnavailable
from imagegen.ledger.postgres import PostgresLedger
from tests.conftest import ROOT
from tests.ledger.chain import chain

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
