"""derive: ``image.persisted`` → ``image.derived``: thumbnail, AVIF/WebP, their record (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imagegen.events import IMAGE_DERIVED, IMAGE_PERSISTED
from imagegen.models import DerivedImage, PersistedImage
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings


async def _derive(service: ImageGenService, image: PersistedImage, call: Call) -> DerivedImage:
    return await service.derive(image)


def _prepare(settings: Settings) -> dict[str, Any]:
    """Pillow's encoders checked before derive says ready: without one, every image would fail
    alike until Pillow is replaced."""
    from imagegen.derivatives import check_encoders

    check_encoders()
    return {}


STAGE = Stage(
    name="derive",
    summary="Encode the thumbnail, AVIF and WebP derivatives of a persisted image; record them.",
    consumes=(IMAGE_PERSISTED,),
    emits=IMAGE_DERIVED,
    input_model=PersistedImage,
    output_model=DerivedImage,
    handler=_derive,
    timeout=lambda settings: 120.0,
    prepare=_prepare,
)
