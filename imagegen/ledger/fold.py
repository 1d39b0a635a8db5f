"""How one event changes its generation's row: the ledger's rules, free of any database.

The stores apply a :class:`Change` with one ``INSERT ... ON CONFLICT DO UPDATE`` whose rules
are the ones written here: the status only moves up :data:`STATUS_RANK`; the first time of a
stage is kept; what the most advanced event says about the image wins; where the generation's
messages go (:data:`REQUEST_COLUMNS`) only the first ``generation.requested`` recorded says,
valid or not, and a later one changes nothing a request says (the first valid one recorded is
the generation's request: one whose data is invalid says nothing of the image).

A stage's time is when the stage did its work: a request's ``requested_at`` (its data's, else
the event's time, as enhance takes it: :func:`~imagegen.identity.request_time`; a replay's, the
event's); ``enhanced_at`` and ``persisted_at``, which enhance and persist keep with what they
wrote; the image's ``rendered_at``; for a failure, when it is first recorded. (An event's
``time`` is often another's: every delivery of an event must answer alike, so enhance's reply
carries the request's time and persist's the render's.)
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from imagegen.errors import InvalidRequest
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
    short_name,
)
from imagegen.identity import (
    MAX_AHEAD,
    generation_id,
    key_time,
    request_time,
    valid_generation_id,
)
from imagegen.ledger._text import storable
from imagegen.ledger.models import STATUS_RANK, LedgerEvent, Status, WebhookEvent
from imagegen.models import (
    DerivedImage,
    EnhancedPrompt,
    GenerationFailed,
    GenerationRequest,
    PersistedImage,
    RenderedImage,
)
from imagegen.validation import parse_model

_M = TypeVar("_M", bound=BaseModel)

__all__ = [
    "CHAIN_ORDER",
    "DESCRIPTIVE_COLUMNS",
    "ONCE_COLUMNS",
    "REQUEST_COLUMNS",
    "STAGE_COLUMNS",
    "Change",
    "due_webhooks",
    "fold",
    "made_good",
    "message_id",
    "of_contributions",
    "utc",
    "without_contributions",
]

# type → (status it reports, column holding the first time it was seen)
_STATUS_OF: dict[str, tuple[Status, str]] = {
    GENERATION_REQUESTED: ("requested", "requested_at"),
    PROMPT_ENHANCED: ("enhanced", "enhanced_at"),
    IMAGE_RENDERED: ("rendered", "rendered_at"),
    IMAGE_PERSISTED: ("persisted", "persisted_at"),
    # Derivatives are made from a persisted image only: the event proves the image final. It
    # carries the image's persisted_at, as image.persisted does, whichever is recorded first.
    IMAGE_DERIVED: ("persisted", "persisted_at"),
    GENERATION_FAILED: ("failed", "failed_at"),
}
CHAIN_ORDER: tuple[str, ...] = tuple(
    sorted(_STATUS_OF, key=lambda kind: (STATUS_RANK[_STATUS_OF[kind][0]], kind == IMAGE_DERIVED))
)
"""The event types in the chain's order: by the status each reports, as the generation's row
ranks them (a failure after rendered, before persisted), ``image.derived`` after the
``image.persisted`` it is made from."""
STAGE_COLUMNS = ("requested_at", "enhanced_at", "rendered_at", "persisted_at", "failed_at")
# What events say about the image; the most advanced event's non-empty value wins. Not a second
# valid generation.requested's (another source and id, recorded after the first valid one): the
# row keeps the first's, the request replay sends. An invalid request says none of them, so the
# first valid one recorded after it still does (enhance fails the one, starts the other).
DESCRIPTIVE_COLUMNS = (
    "prompt",
    "original_prompt",
    "seed",
    "model",
    "width",
    "height",
    "keys",
    "urls",
    "url",
    "location",
    "sha256",
)
# Said once, by the request or the failure: the first value is kept (a second request's none).
ONCE_COLUMNS = ("failed_stage", "error", "replay_of")
# Where the generation's webhook messages go: said by the first generation.requested recorded
# for it, the one that sets requested_at, valid or not (an invalid one's caller is told it
# started and failed, and hears the rest of the generation), and by no other event. A second
# request naming the same generation_id (another source and id) may not name a webhook the
# first left out: it would be sent the generation's prompt and image URLs, signed by the
# ledger. An event recorded before the request (a prompt.enhanced that overtook it) leaves them
# to the request.
REQUEST_COLUMNS = ("webhook", "webhook_events")


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Change:
    """What one event says about its generation."""

    generation_id: str
    status: Status
    at: datetime
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return STATUS_RANK[self.status]

    @property
    def stage_column(self) -> str:
        return _STATUS_OF[_TYPE_OF_STATUS[self.status]][1]


_TYPE_OF_STATUS = {
    status: event_type
    for event_type, (status, _) in _STATUS_OF.items()
    if event_type != IMAGE_DERIVED
}


def fold(event: LedgerEvent, *, now: datetime) -> Change | None:
    """The change ``event`` makes to its generation; None when it names no generation.

    Raises:
        InvalidRequest: the type is not an imagegen event, or its data does not fit the type.
    """
    if event.type not in _STATUS_OF:
        known = ", ".join(short_name(t) for t in _STATUS_OF)
        raise InvalidRequest(
            f"the ledger records imagegen events only ({known}), not {event.type!r}",
            errors=[{"field": "type", "message": "not an imagegen event type"}],
        )
    status, _ = _STATUS_OF[event.type]
    at = utc(_event_time(event.time) if event.time else now)
    fields: dict[str, Any]
    if event.type == GENERATION_REQUESTED:
        found = _requested_generation(event)
        if found is None:
            return None  # enhance's generation.failed names no generation either
        gid = found
        try:
            # Read as recorded, types converted: a request recorded before enhance read its
            # types strictly ("1024" a width) was served, and its history keeps its prompt.
            request = parse_model(GenerationRequest, event.data, strict=False)
        except InvalidRequest:
            # enhance answers it with generation.failed under the same id: the request is
            # part of that generation's history, whatever else it holds, and its caller is
            # told of the failure where the request says how.
            return Change(gid, status, at, _said(_webhook_of_invalid(event.data)))
        # The request's time as enhance takes it: the data's, else the event's (else now).
        # Not a replay's: its data carries the original's time, for the plugins to see again
        # (replay.replay_request); it was requested when its event says, and is listed then.
        if request.replay_of is None:
            at = utc(request_time(request.requested_at, at))
        if at - now > MAX_AHEAD:
            # Enhance refuses a request dated ahead of its clock (identity.not_ahead): it
            # started no generation then. Listed when it came, it does not head the history
            # (and the gallery's latest day) for good.
            at = utc(now)
        fields = {
            "original_prompt": request.prompt,
            "seed": request.seed,
            "model": request.model,
            "width": request.width,
            "height": request.height,
            "replay_of": request.replay_of,
            **_webhook_of(request),
        }
    elif event.type == PROMPT_ENHANCED:
        job = _stage_output(EnhancedPrompt, event.data)
        gid = job.generation_id
        at = utc(job.enhanced_at or at)
        fields = {**_render_fields(job), "replay_of": job.replay_of}
    elif event.type == IMAGE_RENDERED:
        image = _stage_output(RenderedImage, event.data)
        gid = image.generation_id
        at = utc(image.rendered_at or at)
        fields = {
            **_render_fields(image.prompt),
            "keys": {"image": image.key},
            "location": image.location,
            "sha256": image.sha256,
            "replay_of": image.prompt.replay_of,
        }
    elif event.type == IMAGE_PERSISTED:
        persisted = _stage_output(PersistedImage, event.data)
        gid = persisted.generation_id
        at = utc(persisted.persisted_at or at)
        fields = _pick(
            persisted, "prompt", "seed", "model", "width", "height", "keys", "urls", "url"
        )
        fields.update(
            location=persisted.location, sha256=persisted.sha256, replay_of=persisted.replay_of
        )
    elif event.type == IMAGE_DERIVED:
        # Nothing of the generation's row: what it says of the image, image.persisted said.
        derived = _stage_output(DerivedImage, event.data)
        gid = derived.generation_id
        at = utc(derived.persisted_at or at)
        fields = {}
    else:
        failure = _stage_output(GenerationFailed, event.data)
        found = failure.generation_id or event.subject
        if found is None or not valid_generation_id(found):
            return None  # a subject no generation can have: the event, under no generation
        gid = found
        # Its time is the failing event's (every delivery answers alike): the request's, for a
        # failed enhance or render. When it failed is when it is first recorded.
        at = now
        fields = {"failed_stage": failure.stage, "error": failure.error.model_dump(mode="json")}
    return Change(gid, status, at, _said(fields))


def _said(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` without those the event leaves unsaid (None, an empty mapping)."""
    return {k: v for k, v in fields.items() if v not in (None, {})}


def _stage_output(model: type[_M], data: dict[str, Any]) -> _M:
    """``data``, a stage's output, read with its text as the ledger stores it: a lone surrogate
    (JSON's ``\\udfff`` escape), which the models refuse as no UTF-8 text, is U+FFFD
    (:func:`~imagegen.ledger._text.storable`), so an event another producer sent with one is
    recorded as it is stored, never refused at each redelivery. A request keeps its own rule:
    one that enhance refuses is recorded without its fields.

    A job (``prompt.enhanced``, or the job an ``image.rendered`` carries) recorded before a
    job's contributions were bounded (more of them, or more data, than
    :data:`~imagegen.models.MAX_CONTRIBUTIONS` and its kin now allow) is read without them:
    the ledger keeps none of a job's contributions, and an event it once took, or one still in
    flight as the chain is upgraded, is still recorded. Only those bounds are forgiven
    (:func:`_past_contribution_bounds`): contributions of the wrong type, or a
    ``contributions`` key on data that has none, are refused as the stages refuse them."""
    data = storable(data)
    if model in _WITH_JOB:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            if _past_contribution_bounds(exc):
                return parse_model(model, without_contributions(data))
    return parse_model(model, data)


# The stage outputs that hold a job's contributions: the job itself, and the rendered image's.
_WITH_JOB: tuple[type[BaseModel], ...] = (EnhancedPrompt, RenderedImage)
# The ValueErrors of the contributions' bounds in bytes and keys (imagegen.models).
_BOUND_MESSAGE = re.compile(r"(Value error, )?at most \d+ (bytes as UTF-8 JSON, got \d+|keys)")
# What pydantic reports for a list (``too_long``) or a text (``string_too_long``) past its
# ``max_length``: https://docs.pydantic.dev/latest/errors/validation_errors/#too_long
_BOUND_TYPES = frozenset({"too_long", "string_too_long"})


def _past_contribution_bounds(exc: ValidationError) -> bool:
    """Whether every error of ``exc`` is a job's contributions past a bound (too many, too
    long, too many bytes or keys), in a job (``contributions``) or an image's
    (``prompt.contributions``); not a value of the wrong type, nor any other field."""
    errors = exc.errors(include_url=False)
    return bool(errors) and all(
        of_contributions(".".join(str(part) for part in error["loc"]))
        and (
            error["type"] in _BOUND_TYPES
            or (error["type"] == "value_error" and _BOUND_MESSAGE.fullmatch(error["msg"]))
        )
        for error in errors
    )


def of_contributions(field: str) -> bool:
    """Whether error ``field`` is of a job's contributions (``contributions.3.data``, or
    ``prompt.contributions`` in an ``image.rendered``)."""
    return field.removeprefix("prompt.").split(".")[0] == "contributions"


def without_contributions(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with no contributions, its own or its job's (``image.rendered``'s prompt)."""
    data = {name: value for name, value in data.items() if name != "contributions"}
    if isinstance(data.get("prompt"), dict):
        data["prompt"] = without_contributions(data["prompt"])
    return data


def _webhook_of(request: GenerationRequest) -> dict[str, Any]:
    """Where ``request``'s webhook messages go (:data:`REQUEST_COLUMNS`); None without one."""
    if request.webhook is None:
        return {"webhook": None, "webhook_events": None}
    return {"webhook": str(request.webhook), "webhook_events": list(request.webhook_events)}


def _webhook_of_invalid(data: dict[str, Any]) -> dict[str, Any]:
    """Where the messages of a request whose data is invalid go: its ``webhook`` and
    ``webhook_events`` validated on their own, by :class:`GenerationRequest` as a valid request's
    are, so that its caller is told it started and failed; none where they are invalid too.

    Only the URL's form is checked here, as for a valid request: the sender's address rules
    (:class:`~imagegen.ledger.webhooks.AddressPolicy`) apply when each message is sent.
    """
    where = {name: data[name] for name in REQUEST_COLUMNS if name in data}
    try:
        return _webhook_of(parse_model(GenerationRequest, where, strict=False))
    except InvalidRequest:
        return {}


def _requested_generation(event: LedgerEvent) -> str | None:
    """The generation a ``generation.requested`` starts, decided as enhance decides it
    (:func:`~imagegen.identity.generation_id`, from the data's id, the subject, else the event's
    source and id), valid data or not; None where enhance finds none (an id no generation can
    have, a subject that disagrees with it): its ``generation.failed`` then names none."""
    declared = event.data.get("generation_id")
    attributes = {"source": event.source, "id": event.id}
    if event.subject is not None:
        attributes["subject"] = event.subject
    try:
        return generation_id(
            declared if isinstance(declared, str) else None, attributes, starts=True
        )
    except InvalidRequest:
        return None


def _event_time(value: datetime) -> datetime:
    """``value`` if it is a time the service accepts (:func:`~imagegen.identity.key_time`)."""
    try:
        return key_time(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"event time {value.isoformat()}: {exc}",
            errors=[{"field": "time", "message": str(exc)}],
        ) from None


def _render_fields(job: EnhancedPrompt) -> dict[str, Any]:
    """What a stage's job says of its generation: the request's prompt too, for a request
    whose own event comes late or never."""
    return _pick(job, "prompt", "original_prompt", "seed", "model", "width", "height")


def _pick(model: BaseModel, *names: str) -> dict[str, Any]:
    return {name: getattr(model, name) for name in names}


def made_good(status: str, failed_stage: str | None, *, derived: bool) -> bool:
    """Whether the failure a generation's row keeps was made good since: what the failing
    stage was to make exists, so the error is no longer the generation's (its event stays in
    the timeline). ``derived``: an ``image.derived`` is recorded for it.

    The stored image makes good a failure of any stage up to persist (a redelivery, or a
    repeat, stored it). A failure of derive comes after the image is stored, so the status does
    not tell it: the derivatives recorded do, whichever was recorded first (derive makes the
    same ones every time). A generation whose status is ``failed`` keeps its error.
    """
    if failed_stage is None or status != "persisted":
        return False
    return derived or failed_stage != _DERIVE_STAGE


_DERIVE_STAGE = "derive"
"""The stage that makes ``image.derived`` (its ``generation.failed`` names it so)."""


def due_webhooks(status: str, webhook_events: list[str] | None) -> list[WebhookEvent]:
    """The notifications a generation in ``status`` owes a caller who asked for these."""
    wanted = set(webhook_events or ())
    due: list[WebhookEvent] = []
    if "started" in wanted:
        due.append("started")
    if "completed" in wanted and status == "persisted":
        due.append("completed")
    if "failed" in wanted and status == "failed":
        due.append("failed")
    return due


def message_id(generation_id: str, event: str) -> str:
    """The ``webhook-id`` of one notification: stable, so a redelivery is recognisable."""
    return "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, f"imagegen:webhook:{generation_id}:{event}").hex
