"""S3 calls (botocore's own spans) nest under imagegen's storage spans."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from imagegen.storage import S3Storage, s3_options
from imagegen.telemetry import tracer
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from tests.observability.conftest import InMemoryTelemetry


async def test_s3_requests_are_children_of_the_storage_span(
    otel: InMemoryTelemetry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # botocore's instrumentation keeps the tracers of the provider it first saw; an earlier
    # test in this process may have installed another one.
    from opentelemetry.instrumentation.botocore import BotocoreInstrumentor

    S3Storage("warm-up")  # instruments botocore, once per process
    BotocoreInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
    BotocoreInstrumentor().instrument(tracer_provider=otel.tracer_provider)  # type: ignore[no-untyped-call]
    with S3Server() as s3:
        bucket = s3.create_bucket("traced")
        options = s3_options(
            "aws",
            endpoint_url=s3.endpoint,
            access_key_id=SecretStr(ACCESS_KEY_ID),
            secret_access_key=SecretStr(SECRET_ACCESS_KEY),
        )
        storage = S3Storage(bucket, "images", options)
        otel.spans.clear()
        with tracer().start_as_current_span("imagegen.storage.put") as span:
            await storage.put("2026/01/01/g.png", b"png", content_type="image/png")

    spans = otel.finished_spans()
    s3_spans = [s for s in spans if s.name != "imagegen.storage.put"]
    assert [s.name for s in s3_spans] == ["S3.PutObject"]
    [put] = s3_spans
    assert put.parent is not None and put.parent.span_id == span.get_span_context().span_id
    assert put.context.trace_id == span.get_span_context().trace_id
    assert SECRET_ACCESS_KEY not in str(dict(put.attributes or {}))


async def test_a_storage_call_that_fails_is_timed_too(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    from imagegen.errors import DependencyUnavailable, NotFound
    from imagegen.storage import LocalStorage
    from imagegen.storage.instrumented import instrumented
    from imagegen.telemetry import METRIC_NAMES

    def count(outcome: str) -> int:
        return sum(
            p.point.count
            for p in otel.points(METRIC_NAMES["storage_duration"])
            if (p.attributes or {}).get("operation") == "get"
            and (p.attributes or {}).get("outcome") == outcome
        )

    before = {outcome: count(outcome) for outcome in ("success", "missing", "failed")}
    storage = instrumented(LocalStorage(tmp_path))
    await storage.put("2026/01/01/g.png", b"png", content_type="image/png")
    assert await storage.get("2026/01/01/g.png") == b"png"
    with pytest.raises(NotFound):  # an answer, often the one expected: no failure
        await storage.get("2026/01/01/missing.png")

    async def unavailable(key: str) -> bytes:
        raise DependencyUnavailable("local storage: cannot read")

    storage.inner.get = unavailable  # type: ignore[attr-defined]  # the disk gone
    with pytest.raises(DependencyUnavailable):  # a read that fails
        await storage.get("2026/01/01/g.png")
    assert count("success") == before["success"] + 1
    assert count("missing") == before["missing"] + 1
    assert count("failed") == before["failed"] + 1


async def test_a_head_that_finds_nothing_is_a_miss_as_a_get_is(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    from imagegen.storage import LocalStorage
    from imagegen.storage.instrumented import instrumented
    from imagegen.telemetry import METRIC_NAMES

    def count(operation: str, outcome: str) -> int:
        return sum(
            p.point.count
            for p in otel.points(METRIC_NAMES["storage_duration"])
            if (p.attributes or {}).get("operation") == operation
            and (p.attributes or {}).get("outcome") == outcome
        )

    before = {outcome: count("head", outcome) for outcome in ("success", "missing")}
    storage = instrumented(LocalStorage(tmp_path))
    await storage.put("2026/01/01/g.png", b"png", content_type="image/png")
    otel.spans.clear()
    assert await storage.head("2026/01/01/g.png") is not None
    assert await storage.head("2026/01/01/missing.png") is None
    assert count("head", "success") == before["success"] + 1
    assert count("head", "missing") == before["missing"] + 1
    found, missed = [s for s in otel.finished_spans() if s.name == "imagegen.storage.head"]
    assert "imagegen.storage.found" not in (found.attributes or {})
    assert (missed.attributes or {})["imagegen.storage.found"] is False
    assert missed.status.is_ok  # an answer, no error


async def test_a_location_that_fails_is_timed_and_traced_one_that_names_is_not(
    otel: InMemoryTelemetry, tmp_path: Path
) -> None:
    """A local folder linked outside the root fails each key under it (docs/storage.md), the
    name of an object too: that failure shows, as any storage call's does. The names given on
    every request are not measured."""
    from opentelemetry.trace import StatusCode

    from imagegen.errors import ConfigurationError
    from imagegen.storage import LocalStorage
    from imagegen.storage.instrumented import instrumented
    from imagegen.telemetry import METRIC_NAMES

    def count(outcome: str) -> int:
        return sum(
            p.point.count
            for p in otel.points(METRIC_NAMES["storage_duration"])
            if (p.attributes or {}).get("operation") == "location"
            and (p.attributes or {}).get("outcome") == outcome
        )

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "failures").mkdir(parents=True)
    outside.mkdir()
    (root / "failures" / "undated").symlink_to(outside)
    storage = instrumented(LocalStorage(root))
    before = {outcome: count(outcome) for outcome in ("success", "failed")}
    otel.spans.clear()
    assert storage.location("2026/01/01/g.png") == (root / "2026/01/01/g.png").as_uri()
    with pytest.raises(ConfigurationError, match="leads outside the storage root"):
        storage.location("failures/undated/x.json")
    assert count("success") == before["success"]
    assert count("failed") == before["failed"] + 1
    [span] = otel.finished_spans()
    assert span.name == "imagegen.storage.location"
    assert span.status.status_code is StatusCode.ERROR
    assert (span.attributes or {})["imagegen.storage.key"] == "failures/undated/x.json"
    assert span.end_time is not None and span.start_time is not None
    assert span.end_time >= span.start_time
