"""A function exports its metrics once as it starts: counters begun at 0 reach Prometheus at 0.

The periodic reader first exports an interval after start-up (60 s by default); a failure
counted meanwhile would be a series' first sample, and ``increase()`` never sees a first sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.test.globals_test import reset_metrics_globals

from imagegen import observability
from imagegen.events import GENERATION_REQUESTED
from imagegen.observability import Telemetry, create_telemetry
from imagegen.telemetry import instruments
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event
from tests.observability.conftest import InMemoryTelemetry, _install

HOUR_MS = "3600000"  # an export interval no test outlasts: only the start-up export is seen


class Recording(MetricExporter):
    """An exporter that keeps each batch it is given; with ``hang`` set, each export then
    waits until it is released, as one to a collector that never answers would."""

    def __init__(self, *, hang: bool = False) -> None:
        super().__init__()
        self.batches: list[MetricsData] = []
        self.released = threading.Event()
        if not hang:
            self.released.set()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.batches.append(metrics_data)
        self.released.wait(30)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.released.set()

    def values(self, batch: int, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """The value of each series of the counter ``name`` in the ``batch``-th export."""
        found = {}
        for resource_metrics in self.batches[batch].resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            attributes = frozenset((point.attributes or {}).items())
                            found[attributes] = point.value  # type: ignore[union-attr]
        return found


def test_the_reader_made_here_never_waits_on_the_export(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = Recording(hang=True)
    monkeypatch.setattr(observability, "metric_exporter_from_env", lambda: exporter)
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", HOUR_MS)
    telemetry = create_telemetry("imagegen-test", traces=False)
    assert telemetry.meter_provider is not None
    try:
        counter = telemetry.meter_provider.get_meter("tests").create_counter("tests.failed")
        counter.add(0)
        started = time.monotonic()
        flushing = telemetry.export_metrics()
        returned = time.monotonic() - started
        counter.add(1)  # counted after start-up: not in the start-up export
        assert flushing is not None and flushing.is_alive()  # the export still hangs
        assert returned < observability.COLLECT_WAIT
        assert len(exporter.batches) == 1
        assert exporter.values(0, "tests.failed") == {frozenset(): 0}
    finally:
        exporter.released.set()
        telemetry.shutdown(timeout=2.0)


def test_without_a_metrics_exporter_nothing_is_exported_or_started() -> None:
    threads = threading.active_count()
    assert Telemetry().export_metrics() is None
    assert threading.active_count() == threads


@pytest.fixture
def exported(otel: InMemoryTelemetry, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recording]:
    """This process's metrics exported as a function's are, made by its start-up, to memory,
    with an export interval longer than the test; the session's in-memory providers back after."""
    exporter = Recording()
    monkeypatch.setattr(observability, "_active", None)
    monkeypatch.setattr(observability, "metric_exporter_from_env", lambda: exporter)
    reset_metrics_globals()  # no SDK meter provider in place: start-up makes one
    instruments.cache_clear()
    yield exporter
    # The provider made is shut down by the exit handler start-up registered.
    _install(otel.tracer_provider, otel.meter_provider)


def test_a_function_exports_its_zeros_as_it_starts_before_any_request(
    exported: Recording, tmp_path: Path
) -> None:
    env = {
        **base_env(tmp_path / "store"),
        "IMAGEGEN_RENDER_BATCH_SIZE": "0",  # settings that cannot be read: every run fails
        "OTEL_METRIC_EXPORT_INTERVAL": HOUR_MS,
    }
    failed = frozenset(
        {"stage": "enhance", "outcome": "failed", "reason": "not_configured"}.items()
    )
    with InProcessFunction("enhance", env) as function:  # started by its first probe
        assert len(exported.batches) == 1
        assert exported.values(0, "imagegen.generations")[failed] == 0
        reply = post_event(function, GENERATION_REQUESTED, {"prompt": "a fox"}, subject="fe-1")
        assert reply.status_code == 503, reply.text
    # The failure leaves with the next export, as the second sample of a series begun at 0.
    active = observability._active
    assert active is not None and active.meter_provider is not None
    assert active.meter_provider.force_flush(10_000)
    assert exported.values(0, "imagegen.generations")[failed] == 0
    assert exported.values(1, "imagegen.generations")[failed] == 1
