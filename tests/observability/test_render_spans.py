"""The denoising loop and the VAE decode get spans of their own, split at the last step."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from PIL import Image

from imagegen.models import EnhancedPrompt
from imagegen.settings import Settings
from imagegen.telemetry import tracer
from tests.observability.conftest import InMemoryTelemetry


class SelfDecodingPipeline:
    """Steps, then its own decode, in one call, like every diffusers pipeline."""

    def __call__(
        self,
        prompt: str,
        width: int,
        height: int,
        num_inference_steps: int,
        generator: Any,
        callback_on_step_end: Any = None,
    ) -> SimpleNamespace:
        for step in range(num_inference_steps):
            time.sleep(0.005)
            callback_on_step_end(self, step, None, {})
        time.sleep(0.02)  # the decode
        return SimpleNamespace(images=[Image.new("RGB", (width, height))])


def test_denoise_loop_and_decode_are_split_at_the_last_step(otel: InMemoryTelemetry) -> None:
    from imagegen.render.diffusers_backend import DiffusersBackend

    job = EnhancedPrompt.model_validate(
        {
            "generation_id": "spans-1",
            "prompt": "a fox",
            "original_prompt": "a fox",
            "dreamed": False,
            "fallback": False,
            "enhancer": "passthrough",
            "model": "self-decoding",
            "width": 256,
            "height": 256,
            "steps": 3,
            "guidance": 0.0,
            "seed": 1,
            "requested_at": "2026-01-01T00:00:00Z",
        }
    )
    backend = DiffusersBackend(Settings(device="cpu"))
    otel.spans.clear()
    with tracer().start_as_current_span("imagegen.render.denoise") as parent:
        _, denoise, decode = backend._denoise_and_decode(SelfDecodingPipeline(), [job], None)

    spans = {s.name: s for s in otel.finished_spans()}
    loop, vae = spans["imagegen.render.denoise_loop"], spans["imagegen.render.vae_decode"]
    for span in (loop, vae):
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
    assert loop.start_time is not None and loop.end_time is not None
    assert vae.start_time is not None and vae.end_time is not None
    assert loop.end_time == vae.start_time
    assert abs((loop.end_time - loop.start_time) / 1e9 - denoise) < 0.02
    assert abs((vae.end_time - vae.start_time) / 1e9 - decode) < 0.02
    assert (loop.attributes or {})["imagegen.steps"] == 3
