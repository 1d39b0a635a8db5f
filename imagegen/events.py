"""The event contract: types, sources, schemas and ids of the events the stages exchange.

Transport-free: the HTTP/CloudEvents binding lives in ``functions/``.
"""

from __future__ import annotations

import uuid
from typing import Final

from pydantic import BaseModel

from imagegen.models import (
    EnhancedPrompt,
    GenerationFailed,
    GenerationRequest,
    PersistedImage,
    RenderedImage,
)

__all__ = [
    "DREAM_PING",
    "EVENT_MODELS",
    "GENERATION_FAILED",
    "GENERATION_REQUESTED",
    "IMAGE_PERSISTED",
    "IMAGE_RENDERED",
    "PROMPT_ENHANCED",
    "SCHEMA_BASE_URL",
    "STAGES",
    "dataschema",
    "reply_id",
    "short_name",
    "source_for",
]

_PREFIX: Final = "dev.orchestr8.imagegen."
GENERATION_REQUESTED: Final = _PREFIX + "generation.requested"
PROMPT_ENHANCED: Final = _PREFIX + "prompt.enhanced"
IMAGE_RENDERED: Final = _PREFIX + "image.rendered"
IMAGE_PERSISTED: Final = _PREFIX + "image.persisted"
GENERATION_FAILED: Final = _PREFIX + "generation.failed"
# A Knative PingSource can only send this type; enhance treats it as a prompt-less request.
DREAM_PING: Final = "dev.knative.sources.ping"

SCHEMA_BASE_URL: Final = "https://schemas.orchestr8.dev/imagegen/"

EVENT_MODELS: Final[dict[str, type[BaseModel]]] = {
    GENERATION_REQUESTED: GenerationRequest,
    PROMPT_ENHANCED: EnhancedPrompt,
    IMAGE_RENDERED: RenderedImage,
    IMAGE_PERSISTED: PersistedImage,
    GENERATION_FAILED: GenerationFailed,
}

# stage -> (consumed type, reply type)
STAGES: Final[dict[str, tuple[str, str]]] = {
    "enhance": (GENERATION_REQUESTED, PROMPT_ENHANCED),
    "render": (PROMPT_ENHANCED, IMAGE_RENDERED),
    "persist": (IMAGE_RENDERED, IMAGE_PERSISTED),
}


def short_name(event_type: str) -> str:
    """``dev.orchestr8.imagegen.image.rendered`` → ``image.rendered``."""
    return event_type.removeprefix(_PREFIX)


def dataschema(event_type: str) -> str:
    """The published JSON Schema URL of ``event_type``'s data."""
    return f"{SCHEMA_BASE_URL}{short_name(event_type)}.json"


def source_for(stage: str) -> str:
    """The CloudEvents ``source`` of events emitted by ``stage``."""
    return f"/imagegen/{stage}"


def reply_id(generation_id: str, event_type: str) -> str:
    """A stable event id: a redelivered request gets a reply with the same id."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"imagegen:{generation_id}:{event_type}").hex
