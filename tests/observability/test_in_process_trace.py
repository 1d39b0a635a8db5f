"""A generation run in one process (the service's ``generate``, the command line's ``generate``,
``loop`` and ``replay``) is one trace, its stage spans chained as the broker chains the
functions' spans: each stage's span the child of the one before it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult

from imagegen import GenerationRequest, ImageGenService, Settings
from imagegen.telemetry import tracer
from tests.conftest import RunCli
from tests.observability.conftest import InMemoryTelemetry

STAGES = ("imagegen.enhance", "imagegen.render", "imagegen.persist", "imagegen.derive")
SMALL = ["--model", "tiny", "--width", "256", "--height", "256", "--steps", "2"]


def small(**kwargs: object) -> GenerationRequest:
    return GenerationRequest.model_validate(
        {
            "width": 256,
            "height": 256,
            "steps": 2,
            "model": "tiny",
            "requested_at": datetime(2026, 11, 24, 18, 30, tzinfo=UTC),
            **kwargs,
        }
    )


def stage_spans(otel: InMemoryTelemetry, generation_id: str) -> list[ReadableSpan]:
    """The ``imagegen.<stage>`` spans of one generation, in the order they started."""
    spans = [
        s
        for s in otel.finished_spans()
        if s.name in STAGES and (s.attributes or {}).get("imagegen.generation_id") == generation_id
    ]
    return sorted(spans, key=lambda s: s.start_time or 0)


def assert_chained(spans: list[ReadableSpan], names: tuple[str, ...]) -> None:
    """``spans`` are ``names``, in that order, in one trace, each the child of the one before."""
    assert [s.name for s in spans] == list(names)
    assert spans[0].context is not None
    assert {s.context.trace_id for s in spans if s.context is not None} == {
        spans[0].context.trace_id
    }
    for before, after in pairwise(spans):
        assert after.parent is not None and before.context is not None, after.name
        assert after.parent.span_id == before.context.span_id, after.name


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(storage_url=str(tmp_path / "out"), model="tiny", ollama_retries=0)


@pytest.fixture
def cleared(otel: InMemoryTelemetry) -> Iterator[InMemoryTelemetry]:
    otel.spans.clear()
    yield otel


async def test_generate_is_one_trace_started_by_enhance(
    cleared: InMemoryTelemetry, settings: Settings
) -> None:
    async with ImageGenService(settings) as service:
        _, persisted = await service.generate(small(prompt="a lighthouse"))
    spans = stage_spans(cleared, persisted.generation_id)
    assert_chained(spans, STAGES)
    assert spans[0].parent is None  # no caller's trace: enhance starts one


async def test_generate_goes_on_in_the_callers_trace(
    cleared: InMemoryTelemetry, settings: Settings
) -> None:
    async with ImageGenService(settings) as service:
        with tracer().start_as_current_span("caller") as caller:
            _, persisted = await service.generate(small(prompt="a lighthouse"))
    spans = stage_spans(cleared, persisted.generation_id)
    assert_chained(spans, STAGES)
    assert spans[0].parent is not None
    assert spans[0].parent.span_id == caller.get_span_context().span_id


class _DropsEnhance(Sampler):
    """Samples every trace but one that enhance starts."""

    def should_sample(
        self, parent_context: Any, trace_id: int, name: str, *args: Any, **kwargs: Any
    ) -> SamplingResult:
        drop = name == "imagegen.enhance"
        return SamplingResult(Decision.DROP if drop else Decision.RECORD_AND_SAMPLE)

    def get_description(self) -> str:
        return "DropsEnhance"


async def test_the_later_stages_follow_the_sampling_decision_of_enhance(
    cleared: InMemoryTelemetry, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a parent-based sampler (the SDK's default), a trace enhance starts unsampled has
    no stage recorded: render, persist and derive start no sampled traces of their own."""
    monkeypatch.setattr(tracer(), "sampler", ParentBased(_DropsEnhance()))
    async with ImageGenService(settings) as service:
        _, persisted = await service.generate(small(prompt="a lighthouse"))
    assert stage_spans(cleared, persisted.generation_id) == []


async def test_finalise_alone_chains_persist_and_derive(
    cleared: InMemoryTelemetry, settings: Settings
) -> None:
    async with ImageGenService(settings) as service:
        enhanced = await service.enhance(small(prompt="a lighthouse"))
        rendered = await service.render(enhanced)
        cleared.spans.clear()
        persisted = await service.finalise(rendered)
    assert_chained(stage_spans(cleared, persisted.generation_id), STAGES[2:])


def test_the_cli_generate_is_one_trace(cli: RunCli, cleared: InMemoryTelemetry) -> None:
    result = cli("generate", "a lighthouse", *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    gid = json.loads(result.stdout)["image"]["generation_id"]
    spans = stage_spans(cleared, gid)
    assert_chained(spans, STAGES)
    assert spans[0].parent is None


def test_each_image_of_a_loop_is_a_trace_of_its_own(
    cli: RunCli, cleared: InMemoryTelemetry
) -> None:
    result = cli("loop", "a lighthouse", "--count", "2", *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    ids = [json.loads(line)["image"]["generation_id"] for line in result.stdout.splitlines()]
    traces = set()
    for gid in ids:
        spans = stage_spans(cleared, gid)
        assert_chained(spans, STAGES)
        assert spans[0].parent is None
        assert spans[0].context is not None
        traces.add(spans[0].context.trace_id)
    assert len(traces) == 2


@pytest.mark.parametrize(
    ("origin", "names"), [("enhanced", STAGES[1:]), ("requested", STAGES)], ids=lambda v: str(v)
)
def test_a_replay_from_the_cli_is_one_trace(
    cli: RunCli, cleared: InMemoryTelemetry, origin: str, names: tuple[str, ...]
) -> None:
    made = cli("generate", "a lighthouse", *SMALL, "--json")
    assert made.returncode == 0, made.stderr
    original = json.loads(made.stdout)["image"]["generation_id"]
    result = cli("replay", original, "--from", origin, "--json")
    assert result.returncode == 0, result.stderr
    spans = stage_spans(cleared, json.loads(result.stdout)["generation_id"])
    assert_chained(spans, names)
    assert spans[0].parent is None
