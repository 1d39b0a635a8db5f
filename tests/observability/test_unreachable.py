"""A collector that refuses or never answers costs requests nothing but the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, post_event
from tests.observability.blackhole import Blackhole


@pytest.mark.slow
@pytest.mark.parametrize("collector", ["refused", "blackhole"])
def test_requests_succeed_with_an_unreachable_collector(collector: str, tmp_path: Path) -> None:
    with Blackhole() as hole:
        endpoint = hole.url if collector == "blackhole" else "http://127.0.0.1:9"
        env = {
            **base_env(tmp_path / "store"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TIMEOUT": "0.3",  # keeps the exit flush short
            # Export while the requests run, not only at exit.
            "OTEL_BSP_SCHEDULE_DELAY": "20",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
        }
        with FunctionServer("enhance", env, log_dir=tmp_path) as server:
            for i in range(5):
                reply = post_event(
                    server.url,
                    GENERATION_REQUESTED,
                    {"prompt": "a fox", "width": 256, "height": 256},
                    subject=f"unreachable-{i}",
                    timeout=30,
                )
                assert reply.status_code == 200, reply.text
                assert reply.headers["ce-type"] == PROMPT_ENHANCED
        records = server.log_records()
    assert any(r.get("generation_id") == "unreachable-0" and r.get("trace_id") for r in records)
    # Failed exports are logged as JSON lines, not as tracebacks.
    assert "Traceback" not in server.logs()
