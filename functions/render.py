"""render: ``prompt.enhanced`` → ``image.rendered`` (GPU; loads its model at start-up)."""

from __future__ import annotations

import flask
from _runtime import Incoming, Runtime, Stage, serve

from imagegen import ImageGenService
from imagegen.events import IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.models import EnhancedPrompt, RenderedImage
from imagegen.settings import Settings


async def _render(
    service: ImageGenService, job: EnhancedPrompt, incoming: Incoming
) -> RenderedImage:
    return await service.render(job)


async def _render_png(
    service: ImageGenService, job: EnhancedPrompt
) -> tuple[bytes, dict[str, str]]:
    output = await service.render_png(job)
    headers = {
        "X-Imagegen-Generation-Id": job.generation_id,
        "X-Imagegen-Seed": str(job.seed),
        "X-Imagegen-Model": job.model,
    }
    return output.png, headers


def _timeout(settings: Settings) -> float:
    return settings.render_timeout


runtime = Runtime(
    Stage(
        name="render",
        consumes=(PROMPT_ENHANCED,),
        emits=IMAGE_RENDERED,
        input_model=EnhancedPrompt,
        handle=_render,
        timeout=_timeout,
        preload=True,
        png=_render_png,
    )
)


def render(request: flask.Request) -> flask.Response:
    """HTTP entry point (functions-framework target ``render``)."""
    return serve(request, runtime)
