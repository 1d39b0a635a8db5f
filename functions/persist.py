"""persist: ``image.rendered`` → ``image.persisted`` (CPU; never imports torch)."""

from __future__ import annotations

import flask
from _runtime import Incoming, Runtime, Stage, serve

from imagegen import ImageGenService
from imagegen.events import IMAGE_PERSISTED, IMAGE_RENDERED
from imagegen.models import PersistedImage, RenderedImage


async def _persist(
    service: ImageGenService, image: RenderedImage, incoming: Incoming
) -> PersistedImage:
    return await service.persist(image)


runtime = Runtime(
    Stage(
        name="persist",
        consumes=(IMAGE_RENDERED,),
        emits=IMAGE_PERSISTED,
        input_model=RenderedImage,
        handle=_persist,
        timeout=lambda settings: 120.0,
    )
)


def persist(request: flask.Request) -> flask.Response:
    """HTTP entry point (functions-framework target ``persist``)."""
    return serve(request, runtime)
