"""The ledger's HTTP API: one generation, a page of history, a replay sent to the broker.

Served by the ledger function as routes of its stage (:mod:`imagegen.stages.ledger`), behind
the same authentication as ``POST /``; the query models below are the single schema of the
parameters (the OpenAPI document and the 400s that name a field both come from them).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from imagegen.errors import ConfigurationError, DependencyUnavailable, NotFound
from imagegen.events import (
    GENERATION_REQUESTED,
    PROMPT_ENHANCED,
    reply_id,
    routing_attributes,
    source_for,
)
from imagegen.identity import key_time
from imagegen.ledger._sql import MAX_PAGE
from imagegen.ledger.models import GenerationDetail, GenerationPage, Status

if TYPE_CHECKING:
    from imagegen.ledger.store import Ledger
    from imagegen.settings import Settings

__all__ = ["HistoryQuery", "ReplayAccepted", "ReplayQuery", "detail", "page", "replay"]


# Generations are only ever created within the service's years: a bound outside them names
# its field (and never overflows on its way to UTC).
_Time = Annotated[datetime, AfterValidator(key_time)]


class HistoryQuery(BaseModel):
    """``GET /generations``: filters, newest first, a page at a time (:meth:`Ledger.history`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Status | None = None
    since: _Time | None = Field(default=None, description="Created at or after (ISO 8601).")
    until: _Time | None = Field(default=None, description="Created before (ISO 8601).")
    model: str | None = Field(default=None, max_length=256)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(
        default=None, max_length=1024, description="next_cursor of the previous page."
    )


class ReplayQuery(BaseModel):
    """``POST /generations/{id}/replay``: where the replay starts."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    start: Literal["enhanced", "requested"] = Field(
        default="enhanced",
        alias="from",
        description="enhanced: the recorded prompt again (same pixels); requested: enhance again.",
    )


class ReplayAccepted(BaseModel):
    """A replay handed to the broker: the new generation and the event that starts it."""

    generation_id: str
    replay_of: str
    start: Literal["enhanced", "requested"] = Field(alias="from")
    event_type: str
    event_id: str

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


async def detail(ledger: Ledger, generation_id: str) -> GenerationDetail:
    """One generation with its timeline; 404 when unknown."""
    found = await asyncio.to_thread(ledger.get, generation_id)
    if found is None:
        raise NotFound(f"generation {generation_id!r} is not in the ledger")
    return found


async def page(ledger: Ledger, query: HistoryQuery) -> GenerationPage:
    """A page of generations, newest first."""
    return await asyncio.to_thread(ledger.history, **query.model_dump())


async def replay(
    ledger: Ledger, settings: Settings, generation_id: str, query: ReplayQuery
) -> ReplayAccepted:
    """Send the recorded job (or request) of ``generation_id`` to the broker, under a new id.

    Raises:
        NotFound: the generation, or the event to replay, is not recorded.
        NotReplayable: the recorded event is invalid (409).
        ConfigurationError: no broker to send to (``K_SINK``).
        DependencyUnavailable: the broker did not accept the event.
    """
    import httpx
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent

    from imagegen.ledger.replay import replay_job, replay_request

    if query.start == "enhanced":
        data: BaseModel = await asyncio.to_thread(replay_job, ledger, generation_id)
        event_type = PROMPT_ENHANCED
    else:
        data = await asyncio.to_thread(replay_request, ledger, generation_id)
        event_type = GENERATION_REQUESTED
    if not settings.sink_url:
        raise ConfigurationError(
            "no broker to send the replay to: K_SINK is not set",
            errors=[{"field": "sink_url", "message": "required to replay"}],
        )
    new_id = str(data.generation_id)  # type: ignore[attr-defined]
    attributes = {
        "type": event_type,
        "source": source_for("ledger"),
        "id": reply_id(new_id, event_type),
        "subject": new_id,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        **routing_attributes(data),  # render's Triggers route prompt.enhanced by model
    }
    headers, body = to_binary(CloudEvent(attributes, data.model_dump(mode="json")))
    token = await asyncio.to_thread(_sink_token, settings.sink_token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            answer = await client.post(settings.sink_url, headers=headers, content=body)
    except httpx.HTTPError as exc:
        raise DependencyUnavailable(f"the broker is unreachable: {exc}", retry_after=5) from None
    if answer.status_code >= 300:
        raise DependencyUnavailable(
            f"the broker answered {answer.status_code} to the replay", retry_after=5
        )
    return ReplayAccepted.model_validate(
        {
            "generation_id": new_id,
            "replay_of": generation_id,
            "from": query.start,
            "event_type": event_type,
            "event_id": attributes["id"],
        }
    )


def _sink_token(path: Path) -> str | None:
    """The broker's OIDC token, read afresh: Knative renews the mounted Secret before expiry.

    With ``authentication-oidc`` on, the SinkBinding mounts a Secret holding a token for the
    sink's audience at ``/oidc/token`` (knative/eventing
    pkg/apis/sources/v1/sinkbinding_lifecycle.go, ``Do``; the ``token`` key is written by
    pkg/reconciler/sinkbinding/sinkbinding.go, ``renewOIDCTokenSecret``). Without it, none.
    """
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
