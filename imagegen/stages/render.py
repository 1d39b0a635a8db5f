"""render: ``prompt.enhanced`` → ``image.rendered``: the PNG, stored (GPU; loads its model)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from imagegen.errors import InvalidRequest
from imagegen.events import IMAGE_RENDERED, PROMPT_ENHANCED
from imagegen.identity import new_generation_id
from imagegen.models import EnhancedPrompt, RenderedImage, RenderRequest, derive_seed
from imagegen.modelspec import family_for, served_errors
from imagegen.stages import Call, Direct, Stage
from imagegen.validation import parse_model

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


def _complete(settings: Settings, request: RenderRequest) -> EnhancedPrompt:
    """The job of a direct call: what the caller left out, as enhance would have fixed it."""
    model = request.model if request.model is not None else settings.model
    # The name is the caller's: it is checked against the served models before its family is
    # looked for, since family_for reads a local path's files and only the operator's may be.
    refused = served_errors(model, settings.served_models)
    if refused:
        raise InvalidRequest("invalid EnhancedPrompt: model", errors=refused)
    family = family_for(model)
    generation_id = request.generation_id or new_generation_id()
    requested_at = request.requested_at or datetime.now(UTC)
    by_day = request.requested_at is None and request.generation_id is not None
    if by_day:
        # A retry of the same body must be the same job (its fingerprint decides whether the
        # stored image answers it): a named generation without a time is dated by the day,
        # and by render, once the generation is rendered, by that day (a retry after midnight).
        requested_at = requested_at.replace(hour=0, minute=0, second=0, microsecond=0)
    filled = {
        "generation_id": generation_id,
        "model": model,
        "steps": request.steps or family.default_steps,
        "guidance": family.default_guidance if request.guidance is None else request.guidance,
        "seed": derive_seed(generation_id) if request.seed is None else request.seed,
        "requested_at": requested_at,
    }
    job = parse_model(EnhancedPrompt, {**request.model_dump(), **filled})
    return job.as_dated_by_day() if by_day else job


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
    direct=Direct(model=RenderRequest, complete=_complete),
)
