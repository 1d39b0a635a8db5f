"""Tracing and metrics instruments of imagegen (OpenTelemetry API only).

The library records spans and metrics through the API; without an SDK configured they cost
nothing. :mod:`imagegen.observability` sets up the SDK for the functions and the CLI.
The metric names below are the ones the dashboards and alert rules in ``knative/observability``
use; a test keeps them in step.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

from opentelemetry import metrics, trace

__all__ = ["METRIC_NAMES", "Instruments", "instruments", "tracer"]

_SCOPE = "imagegen"


def tracer() -> trace.Tracer:
    """The tracer every imagegen span comes from."""
    return trace.get_tracer(_SCOPE)


class Instruments(NamedTuple):
    stage_duration: metrics.Histogram
    generations: metrics.Counter
    ollama_duration: metrics.Histogram
    enhance_fallbacks: metrics.Counter
    model_load_duration: metrics.Histogram
    denoise_step_duration: metrics.Histogram
    renders_in_flight: metrics.UpDownCounter
    render_rejections: metrics.Counter
    storage_bytes_written: metrics.Counter
    storage_duration: metrics.Histogram


METRIC_NAMES: dict[str, str] = {
    "stage_duration": "imagegen.stage.duration",
    "generations": "imagegen.generations",
    "ollama_duration": "imagegen.ollama.duration",
    "enhance_fallbacks": "imagegen.enhance.fallbacks",
    "model_load_duration": "imagegen.model.load.duration",
    "denoise_step_duration": "imagegen.render.denoise.step.duration",
    "renders_in_flight": "imagegen.render.in_flight",
    "render_rejections": "imagegen.render.rejections",
    "storage_bytes_written": "imagegen.storage.written",
    "storage_duration": "imagegen.storage.duration",
}


@cache
def instruments() -> Instruments:
    """The metric instruments, created once per process from the global meter provider."""
    meter = metrics.get_meter(_SCOPE)
    n = METRIC_NAMES
    return Instruments(
        stage_duration=meter.create_histogram(
            n["stage_duration"], unit="s", description="Time one stage took for one generation."
        ),
        generations=meter.create_counter(
            n["generations"],
            unit="{generation}",
            description="Stage outcomes: success, fallback, failed.",
        ),
        ollama_duration=meter.create_histogram(
            n["ollama_duration"], unit="s", description="Latency of Ollama chat calls."
        ),
        enhance_fallbacks=meter.create_counter(
            n["enhance_fallbacks"], unit="{prompt}", description="Prompts composed without the LLM."
        ),
        model_load_duration=meter.create_histogram(
            n["model_load_duration"], unit="s", description="Model load (cold start) time."
        ),
        denoise_step_duration=meter.create_histogram(
            n["denoise_step_duration"], unit="s", description="Denoising seconds per step."
        ),
        renders_in_flight=meter.create_up_down_counter(
            n["renders_in_flight"], unit="{render}", description="Renders running or queued."
        ),
        render_rejections=meter.create_counter(
            n["render_rejections"],
            unit="{render}",
            description="Renders refused at capacity (429).",
        ),
        storage_bytes_written=meter.create_counter(
            n["storage_bytes_written"], unit="By", description="Bytes written to object storage."
        ),
        storage_duration=meter.create_histogram(
            n["storage_duration"], unit="s", description="Latency of storage operations."
        ),
    )
