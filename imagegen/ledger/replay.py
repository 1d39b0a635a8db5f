"""Replay: the ledger alone reproduces a generation.

From ``enhanced`` (the default) the recorded ``prompt.enhanced`` is sent again under a new
generation id: same prompt, seed, model, size and steps, hence (on the same device) the same
pixels and, since the PNG records only render parameters, the same bytes. From ``requested``
the recorded request runs through enhancement again, at its original time.

A recorded event that does not validate (the ledger records invalid requests too: enhance
fails them under the same id) cannot be replayed: a 409 naming what is wrong with it. Each is
judged and sent as it came (:attr:`~imagegen.ledger.models.LedgerEvent.data_as_received`), not
as the ledger stores its text: a NUL or a lone surrogate, stored as U+FFFD, is not made valid
by it, nor replayed as U+FFFD.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from imagegen.errors import InvalidRequest, NotFound
from imagegen.events import GENERATION_REQUESTED, IMAGE_RENDERED, PROMPT_ENHANCED, short_name
from imagegen.ledger.fold import of_contributions, without_contributions
from imagegen.ledger.store import Ledger
from imagegen.models import EnhancedPrompt, GenerationRequest, new_generation_id
from imagegen.validation import field_errors

__all__ = ["NotReplayable", "ReplayFrom", "check_from", "replay_job", "replay_request"]

ReplayFrom = Literal["enhanced", "requested"]
M = TypeVar("M", bound=BaseModel)


class NotReplayable(InvalidRequest):
    """The recorded event is invalid (it failed the generation): replaying it would fail again.

    A 409: the request is fine, the generation's record is what it conflicts with.
    """

    code = "not_replayable"
    status = 409


def _valid(model: type[M], data: dict[str, Any], generation_id: str, event_type: str) -> M:
    try:
        # Types converted (strict=False): a request recorded before enhance read its types
        # strictly ("1024" a width) was served, and is replayed with its values as they are
        # meant; the replay sends them in their own types.
        return model.model_validate(data, strict=False)
    except ValidationError as exc:
        errors = field_errors(exc)
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise NotReplayable(
            f"generation {generation_id!r} cannot be replayed: its recorded "
            f"{short_name(event_type)} event is invalid ({fields})",
            errors=errors,
        ) from None


def _validates(model: type[BaseModel], data: dict[str, Any]) -> bool:
    """Whether :func:`_valid` takes ``data``."""
    try:
        model.model_validate(data, strict=False)
    except ValidationError:
        return False
    return True


def _recorded(ledger: Ledger, generation_id: str, *types: str) -> tuple[str, dict[str, Any]]:
    """The type and data (as it came) of the event of ``types`` to replay: the
    ``generation.requested`` the generation's row describes, the first valid one recorded
    (another naming the same generation later, from another source, changes nothing of it),
    else the latest in time (the last job written).

    A request whose data is invalid is replayed only where no valid one is recorded (a 409):
    the row names one where it was recorded first and a valid request's job described the
    image before that request itself was recorded."""
    if ledger.get(generation_id) is None:
        raise NotFound(f"generation {generation_id!r} is not in the ledger")
    if types == (GENERATION_REQUESTED,):
        requests = [
            event
            for event in ledger.generation_events(generation_id, order="recorded")
            if event.type == GENERATION_REQUESTED
        ]
        valid = [
            event for event in requests if _validates(GenerationRequest, event.data_as_received)
        ]
        candidates = valid or requests
    else:
        candidates = list(reversed(ledger.generation_events(generation_id)))
    for event in candidates:
        if event.type in types:
            return event.type, event.data_as_received
    names = " or ".join(short_name(t) for t in types)
    message = f"generation {generation_id!r} has no recorded {names} event to replay"
    if GENERATION_REQUESTED not in types and any(
        e.type == GENERATION_REQUESTED for e in ledger.generation_events(generation_id)
    ):
        message += "; from=requested replays its request"
    raise NotFound(message)


def replay_job(
    ledger: Ledger,
    generation_id: str,
    *,
    new_id: str | None = None,
    enhanced_at: datetime | None = None,
) -> EnhancedPrompt:
    """The recorded render job of ``generation_id``, under a new id that links back to it.

    ``enhanced_at`` is when the replay's job counts as written: the time of the event that
    sends it when None (the ledger's replay sends it now, and its retries say the same), the
    replay's own moment where the job goes straight to render (the CLI). The request's time
    stays the original's: it names the image's day, and the pixels depend on neither.

    Raises:
        NotFound: the generation, or its ``prompt.enhanced`` (or ``image.rendered``), is unknown.
        NotReplayable: the recorded job is invalid.
    """
    kind, data = _recorded(ledger, generation_id, PROMPT_ENHANCED, IMAGE_RENDERED)
    recorded = data.get("prompt") if kind == IMAGE_RENDERED else data
    if not isinstance(recorded, dict):
        recorded = {}
    try:
        job = _valid(EnhancedPrompt, recorded, generation_id, kind)
    except NotReplayable as exc:
        # A job recorded before a job's contributions were bounded is replayed without them:
        # they say what the plugins added, and change nothing of the image (its prompt and
        # LoRAs are the job's own fields), while render would refuse the job with them.
        if not exc.errors or not all(of_contributions(e.get("field", "")) for e in exc.errors):
            raise
        job = _valid(EnhancedPrompt, without_contributions(recorded), generation_id, kind)
    return job.model_copy(
        update={
            "generation_id": new_id or new_generation_id(),
            "replay_of": generation_id,
            # Not the original's: the new generation's job is written when it is replayed.
            "enhanced_at": enhanced_at,
        }
    )


def replay_request(
    ledger: Ledger, generation_id: str, *, new_id: str | None = None
) -> GenerationRequest:
    """The recorded request of ``generation_id``, under a new id that links back to it.

    Raises:
        NotFound: the generation, or its ``generation.requested``, is unknown.
        NotReplayable: the recorded request is invalid (the generation failed at enhance).
    """
    _, data = _recorded(ledger, generation_id, GENERATION_REQUESTED)
    request = _valid(GenerationRequest, data, generation_id, GENERATION_REQUESTED)
    original = ledger.get(generation_id)
    # Time-aware plugins saw the original time, and every plugin the seed enhance drew for a
    # request without one (it derives from the id, which is new): let them see both again.
    when = request.requested_at or (original.requested_at if original else None)
    seed = request.seed if request.seed is not None else (original.seed if original else None)
    return request.model_copy(
        update={
            "generation_id": new_id or new_generation_id(),
            "requested_at": when,
            "seed": seed,
            "replay_of": generation_id,
            # The original caller asked to hear of its own generation, not of an operator's
            # replay of it: the replay notifies no one.
            "webhook": None,
        }
    )


def check_from(value: str) -> ReplayFrom:
    """``value`` as a replay starting point, or a 400 naming ``from``."""
    if value not in ("enhanced", "requested"):
        raise InvalidRequest(
            f"replay starts from 'enhanced' or 'requested', not {value!r}",
            errors=[{"field": "from", "message": "must be 'enhanced' or 'requested'"}],
        )
    return value  # type: ignore[return-value]
