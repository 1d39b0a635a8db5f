"""An Ollama call past ``ollama_timeout`` is traced and measured as a timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen.enhance.llm import OllamaEnhancer
from imagegen.models import GenerationRequest
from imagegen.service import ImageGenService
from imagegen.settings import Settings
from imagegen.stages import Call
from imagegen.telemetry import METRIC_NAMES
from tests.fakes.ollama_server import Behaviour, FakeOllama
from tests.observability.conftest import InMemoryTelemetry


def timeouts_measured(otel: InMemoryTelemetry, model: str) -> int:
    """How many Ollama calls the duration metric has counted as failed by a timeout."""
    labels = {"gen_ai.request.model": model, "outcome": "error", "error.type": "TimeoutError"}
    points = otel.points(METRIC_NAMES["ollama_duration"])
    return sum(p.point.count for p in points if p.attributes == labels)


# No retry: the write's deadline (one ollama_timeout) ends the call. One retry allowed: the
# call ends at its own ollama_timeout, before the deadline (and a timeout is not retried).
@pytest.mark.parametrize("retries", [0, 1])
async def test_a_reply_past_the_timeout_is_a_timeout_error_on_the_span_and_metric(
    otel: InMemoryTelemetry, tmp_path: Path, retries: int
) -> None:
    otel.spans.clear()
    with FakeOllama() as fake:
        # Each piece of the reply in time for httpx's per-read timeout, the whole of it not:
        # the call ends at ollama_timeout, as one whose reply never comes.
        fake.answer(Behaviour(trickle=0.1))
        settings = Settings(
            storage_url=str(tmp_path / "out"),
            model="tiny",
            ollama_host=fake.url,
            ollama_timeout=0.5,
            ollama_retries=retries,
            ollama_breaker_threshold=1,
        )
        before = timeouts_measured(otel, settings.ollama_model)
        async with ImageGenService(settings) as service:
            request = GenerationRequest(prompt="a fox", width=256, height=256)
            job = await service.enhance(request, Call(generation_id="obs-ollama-timeout-1"))
            enhancer = service.enhance_stage.enhancer
            assert isinstance(enhancer, OllamaEnhancer)
            assert enhancer.breaker.state == "open", "the write's timeout counts against Ollama"
        assert len(fake.chat_requests) == 1
    spans = otel.finished_spans()

    # 1. The call's span: a timeout, said as one.
    [chat] = [s for s in spans if s.name == "imagegen.ollama.chat"]
    assert chat.attributes is not None
    assert chat.attributes["error.type"] == "TimeoutError"
    assert chat.status.description == "TimeoutError: no reply within 0.5s"
    [event] = [e for e in chat.events if e.name == "exception"]
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "TimeoutError"

    # 2. The duration metric: the call failed by a timeout.
    assert timeouts_measured(otel, settings.ollama_model) - before == 1

    # 3. The prompt falls back to the template, for a timeout.
    assert job.fallback
    [stage] = [s for s in spans if s.name == "imagegen.enhance"]
    [fallback] = [e for e in stage.events if e.name == "imagegen.enhance.fallback"]
    assert fallback.attributes == {"reason": "timeout"}
