"""What the ledger records and answers: events as received, one row per generation, pages."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from imagegen.events import ID_MAX_LENGTH, SOURCE_MAX_LENGTH, TYPE_MAX_LENGTH
from imagegen.models import ErrorInfo

__all__ = [
    "STATUS_RANK",
    "WEBHOOK_EVENTS",
    "Delivery",
    "Generation",
    "GenerationDetail",
    "GenerationPage",
    "IngestResult",
    "LedgerEvent",
    "Status",
    "TimelineEntry",
    "WebhookEvent",
    "WebhookMessage",
]

Status = Literal["requested", "enhanced", "rendered", "failed", "persisted"]
WebhookEvent = Literal["started", "completed", "failed"]
WEBHOOK_EVENTS: Final[tuple[WebhookEvent, ...]] = ("started", "completed", "failed")

# A status only ever moves up this order, so late or redelivered events cannot undo progress.
# `failed` outranks the working states (a late `rendered` does not revive a failed generation)
# but not `persisted`: a stored image proves the generation succeeded, e.g. when a redelivery
# succeeded after another delivery of the same event was reported failed.
STATUS_RANK: Final[dict[str, int]] = {
    "requested": 0,
    "enhanced": 1,
    "rendered": 2,
    "failed": 3,
    "persisted": 4,
}


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class LedgerEvent(_View):
    """One CloudEvent as the ledger keeps it; ``source`` + ``id`` identify it.

    The bounds are :mod:`imagegen.events`', which every stage enforces too: an event the
    chain accepts is one the ledger records. The characters a CloudEvents String must not hold
    (:func:`imagegen.events.text_problem`) are refused in an event's attributes by every
    stage's binding, the ledger's included, and not here: an event recorded before that rule
    is read back as it was stored.
    """

    source: str = Field(min_length=1, max_length=SOURCE_MAX_LENGTH)
    id: str = Field(min_length=1, max_length=ID_MAX_LENGTH)
    type: str = Field(min_length=1, max_length=TYPE_MAX_LENGTH)
    subject: str | None = None
    time: datetime | None = Field(default=None, description="The event's time; default: now.")
    data: dict[str, Any] = Field(default_factory=dict)
    generation_id: str | None = Field(default=None, description="Set when recorded.")
    recorded_at: datetime | None = Field(default=None, description="Set when recorded.")
    received: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Set when recorded, where data held a NUL or a lone surrogate, which the ledger "
            "stores as U+FFFD in data: the data as it came, which replay judges and sends."
        ),
    )

    @property
    def data_as_received(self) -> dict[str, Any]:
        """``data`` as its producer sent it (:attr:`received`, else ``data`` itself)."""
        return self.data if self.received is None else self.received


class IngestResult(_View):
    """What recording one event did."""

    generation_id: str | None
    duplicate: bool = Field(description="True when this source + id was recorded before.")
    status: Status | None = Field(default=None, description="The generation's status after it.")


class Generation(_View):
    """One generation: its current status and what is known about it so far."""

    generation_id: str
    status: Status
    created_at: datetime = Field(description="When the generation was first seen.")
    updated_at: datetime
    requested_at: datetime | None = None
    enhanced_at: datetime | None = None
    rendered_at: datetime | None = None
    persisted_at: datetime | None = None
    failed_at: datetime | None = None
    failed_stage: str | None = None
    error: ErrorInfo | None = None
    prompt: str | None = Field(default=None, description="The final prompt.")
    original_prompt: str | None = None
    seed: int | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    keys: dict[str, str] = Field(default_factory=dict)
    urls: dict[str, str] = Field(default_factory=dict)
    url: str | None = None
    location: str | None = None
    sha256: str | None = None
    replay_of: str | None = Field(default=None, description="The generation this one replays.")


class TimelineEntry(_View):
    """One recorded event of a generation, with the time since the one before."""

    type: str
    source: str
    id: str
    time: datetime
    seconds_since_previous: float | None = None


class GenerationDetail(Generation):
    """A generation with its timeline and the seconds each stage took."""

    timeline: list[TimelineEntry] = Field(default_factory=list)
    durations: dict[str, float] = Field(
        default_factory=dict, description="Seconds: enhance, render, persist, total."
    )


class GenerationPage(_View):
    """Generations, newest first; ``next_cursor`` fetches the next page."""

    items: list[Generation]
    next_cursor: str | None = None
    _unreadable: list[str] = PrivateAttr(default_factory=list)

    @property
    def unreadable(self) -> list[str]:
        """The generations of this page whose records cannot be read, left out of ``items``
        (not part of the API's answer: the ledger logs them)."""
        return self._unreadable


class Delivery(_View):
    """A webhook message waiting to be (re)sent."""

    msg_id: str
    generation_id: str
    event: WebhookEvent
    url: str
    payload: str = Field(description="The exact JSON body that is signed and sent.")
    attempts: int
    created_at: datetime


class WebhookMessage(_View):
    """The body of one webhook message: its times in UTC, written ``…Z`` as the API writes them."""

    type: str = Field(description="generation.started, generation.completed or generation.failed.")
    timestamp: datetime = Field(
        description="When the event that made the message due was recorded."
    )
    data: Generation
