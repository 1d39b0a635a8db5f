"""render: ``prompt.enhanced`` → ``image.rendered``: the PNG, stored (GPU; loads its model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagegen.events import IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.models import EnhancedPrompt, RenderedImage
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings


async def _render(service: ImageGenService, job: EnhancedPrompt, call: Call) -> RenderedImage:
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


STAGE = Stage(
    name="render",
    summary="Render and store the PNG; or return it with Accept: image/png.",
    consumes=(PROMPT_ENHANCED,),
    emits=IMAGE_RENDERED,
    input_model=EnhancedPrompt,
    output_model=RenderedImage,
    handler=_render,
    timeout=_timeout,
    loads_model=True,
    png=_render_png,
)
