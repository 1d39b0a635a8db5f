"""enhance: ``generation.requested`` → ``prompt.enhanced`` (CPU; never imports torch)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import flask
from _runtime import Incoming, Runtime, Stage, serve

from imagegen import ImageGenService
from imagegen.errors import InvalidRequest
from imagegen.events import DREAM_PING, GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.models import (
    EnhancedPrompt,
    GenerationRequest,
    derive_generation_id,
    new_generation_id,
)
from imagegen.settings import Settings


async def _enhance(
    service: ImageGenService, request: GenerationRequest, incoming: Incoming
) -> EnhancedPrompt:
    # A redelivered event must map to the same generation: the id comes from the event
    # (subject, else source + id) and the time from the event's `time`, never from a clock.
    gid = request.generation_id or incoming.attribute("subject")
    if gid is None and incoming.event is not None:
        gid = derive_generation_id(str(incoming.attribute("source")), str(incoming.attribute("id")))
    now = _event_time(incoming.attribute("time"))
    return await service.enhance(request, generation_id=gid or new_generation_id(), now=now)


def _event_time(value: Any) -> datetime | None:
    """The event's ``time``: it fixes the request time, so a redelivery gets the same one."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"event time {str(value)[:40]!r} is not an RFC 3339 timestamp",
            errors=[{"field": "time", "message": "not an RFC 3339 timestamp"}],
        ) from None


def _timeout(settings: Settings) -> float:
    return settings.ollama_timeout * (settings.ollama_retries + 1) + 30


runtime = Runtime(
    Stage(
        name="enhance",
        # A PingSource can only send its own type: a ping is a request with no prompt (dreaming).
        consumes=(GENERATION_REQUESTED, DREAM_PING),
        emits=PROMPT_ENHANCED,
        input_model=GenerationRequest,
        handle=_enhance,
        timeout=_timeout,
        starts_generations=True,
    )
)


def enhance(request: flask.Request) -> flask.Response:
    """HTTP entry point (functions-framework target ``enhance``)."""
    return serve(request, runtime)
