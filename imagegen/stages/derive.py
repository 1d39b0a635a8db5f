"""derive: ``image.persisted`` → ``image.derived``: thumbnail, AVIF/WebP, their record (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagegen.events import IMAGE_DERIVED, IMAGE_PERSISTED
from imagegen.models import DerivedImage, PersistedImage
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.service import ImageGenService


async def _derive(service: ImageGenService, image: PersistedImage, call: Call) -> DerivedImage:
    return await service.derive(image)


STAGE = Stage(
    name="derive",
    summary="Encode the thumbnail, AVIF and WebP derivatives of a persisted image; record them.",
    consumes=(IMAGE_PERSISTED,),
    emits=IMAGE_DERIVED,
    input_model=PersistedImage,
    output_model=DerivedImage,
    handler=_derive,
    timeout=lambda settings: 120.0,
)
