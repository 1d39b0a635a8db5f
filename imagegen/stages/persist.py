"""persist: ``image.rendered`` → ``image.persisted``: the record and URLs (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagegen.events import IMAGE_PERSISTED, IMAGE_RENDERED
from imagegen.models import PersistedImage, RenderedImage
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.service import ImageGenService


async def _persist(service: ImageGenService, image: RenderedImage, call: Call) -> PersistedImage:
    return await service.persist(image)


async def _warm_up(service: ImageGenService) -> None:
    # The stage and its modules (the record, the URLs) made here, as a first event would make
    # them: after readiness, so the probe never waits for it (adr/0011).
    service.persist_stage  # noqa: B018  (the property builds it: not an assert, which -O drops)


STAGE = Stage(
    name="persist",
    summary="Write the metadata record; return URLs.",
    consumes=(IMAGE_RENDERED,),
    emits=IMAGE_PERSISTED,
    input_model=RenderedImage,
    output_model=PersistedImage,
    handler=_persist,
    timeout=lambda settings: 120.0,
    warm_up=_warm_up,
)
