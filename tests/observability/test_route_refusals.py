"""The ledger's queries are no deliveries: refused, they are not counted as one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen.auth.api_keys import hash_api_key
from imagegen.telemetry import METRIC_NAMES
from tests.functions.clients import InProcessFunction
from tests.ledger.conftest import close_served_ledgers
from tests.observability.conftest import InMemoryTelemetry

KEY = "ledger-test-key-0123456789"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[InProcessFunction]:
    """The ledger function on SQLite, authentication on (one API key), in this process."""
    env = {
        "IMAGEGEN_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "IMAGEGEN_AUTH_REQUIRED": "true",
        "IMAGEGEN_API_KEY_HASHES": hash_api_key(KEY),
    }
    function = InProcessFunction("ledger", env)
    yield function
    close_served_ledgers([function])


def test_a_refused_query_is_no_failed_delivery(
    otel: InMemoryTelemetry, ledger: InProcessFunction
) -> None:
    def failed() -> int:
        return sum(
            p.point.value
            for p in otel.points(METRIC_NAMES["sink_deliveries"])
            if p.attributes.get("stage") == "ledger" and p.attributes.get("outcome") == "failed"
        )

    before = failed()
    for path in ("/generations", "/generations/gen-a"):
        assert ledger.get(path).status_code == 401
    assert ledger.client.post("/generations/gen-a/replay").status_code == 401
    assert failed() == before
    # A delivery refused alike is counted: what the broker may drop.
    assert ledger.post("/", json={}).status_code == 401
    assert failed() == before + 1
