"""The ledger's HTTP API: one generation, a page of history, a replay sent to the broker.

Served by the ledger function as routes of its stage (:mod:`imagegen.stages.ledger`), behind
the same authentication as ``POST /``; the query models below are the single schema of the
parameters (the OpenAPI document and the 400s that name a field both come from them).

The function's blocking calls on the ledger (psycopg, sqlite3) run on the ledger's own daemon
threads (:func:`blocking`), never on the loop's default executor, whose threads the interpreter
joins at exit: a call stuck on a database that stopped answering after it connected is
abandoned at the function's timeout (a 503), and left behind when the process is told to stop,
rather than holding the worker past its grace period.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from imagegen._threads import DaemonPool, PoolExhausted
from imagegen.errors import (
    ConfigurationError,
    DependencyUnavailable,
    InternalError,
    InvalidRequest,
    NotFound,
    first_line,
)
from imagegen.events import (
    GENERATION_REQUESTED,
    PROMPT_ENHANCED,
    dataschema,
    header_value,
    reply_id,
    routing_attributes,
    source_for,
)
from imagegen.identity import derive_generation_id, key_time, parse_rfc3339
from imagegen.ledger._sql import MAX_PAGE
from imagegen.ledger.models import GenerationDetail, GenerationPage, Status
from imagegen.models import MaybeTime
from imagegen.telemetry import trace_extension

if TYPE_CHECKING:
    from imagegen.ledger.store import Ledger
    from imagegen.settings import Settings

__all__ = [
    "MAX_THREADS",
    "THREAD_WAIT",
    "HistoryQuery",
    "ReplayAccepted",
    "ReplayQuery",
    "blocking",
    "detail",
    "page",
    "replay",
]

T = TypeVar("T")

MAX_THREADS = 32
"""Threads the ledger's blocking calls may hold at once, in a process: as many as the loop's
default executor has at most (``min(32, CPUs + 4)``). Started only as needed. A call on a
database gone silent holds one until the connection's TCP timeouts end it
(:data:`imagegen.ledger.postgres.SOCKET_DEFAULTS`), or for good where TCP cannot tell (a hung
server whose host still acknowledges); its caller is answered at the function's timeout."""
THREAD_WAIT = 10.0
"""Seconds a call past :data:`MAX_THREADS` waits for a thread while no thread takes any call,
before it fails with a retryable 503: every thread held that long by a database that does not
answer. Calls that end, however many wait, are each run in turn."""


_POOL = DaemonPool("imagegen-ledger", max_threads=MAX_THREADS, queue_for=THREAD_WAIT)


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Await ``fn(*args, **kwargs)`` on one of the ledger's daemon threads (see the module).

    Raises:
        DependencyUnavailable: every thread has been held by a call that does not return for
            :data:`THREAD_WAIT` (retryable).
    """
    try:
        return await _POOL.run(functools.partial(fn, *args, **kwargs))
    except PoolExhausted as exc:
        raise DependencyUnavailable(
            f"the ledger call was not started: {exc} (a database that does not answer)"
        ) from None


def _bound(value: object) -> object:
    # The ledger keeps its times to the microsecond: a bound finer than that is raised to the
    # next one, so that each generation stays on its side of it ("at or after" 24.5575141 is
    # "at or after" 24.557515; "before" it, "before" 24.557515). The range is the instant's,
    # checked before it is raised: 1969's last tenth of a microsecond is refused, and one in
    # 2999's last microsecond stays there, the last one the field takes. Anything it cannot
    # read, or out of range, goes on to the rule of the field, which refuses it and names it.
    if isinstance(value, str):
        try:
            exact = key_time(parse_rfc3339(value))
        except ValueError:
            return value
        try:
            return key_time(parse_rfc3339(value, round_up=True))
        except ValueError:
            return exact
    return value


def _digits(value: object) -> object:
    # A number in a query is digits and nothing else, as a time is RFC 3339 and nothing else:
    # no sign, no "_", no space, no ".0", which pydantic's int would otherwise take.
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written in digits (0-9)")
    return value


_Bound = Annotated[MaybeTime, BeforeValidator(_bound)]


class HistoryQuery(BaseModel):
    """``GET /generations``: filters, newest first, a page at a time (:meth:`Ledger.history`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Status | None = None
    # A bound is read as an event's time is (imagegen.models.MaybeTime): an RFC 3339 timestamp
    # with its offset, as the document's "format: date-time" says, never by pydantic's own
    # rule (a date alone, no offset or a number of seconds taken as UTC, a leap second
    # refused). Generations are only ever created within the service's years: a bound outside
    # them names its field (and never overflows on its way to UTC).
    since: _Bound = Field(
        default=None,
        description="Created at or after: an RFC 3339 date-time with its offset "
        "(2026-06-01T00:00:00Z; a + percent-encoded as %2B).",
    )
    until: _Bound = Field(
        default=None, description="Created before: an RFC 3339 date-time with its offset."
    )
    model: str | None = Field(default=None, min_length=1, max_length=256)
    limit: Annotated[int, BeforeValidator(_digits)] = Field(default=50, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(
        default=None, max_length=1024, description="next_cursor of the previous page."
    )


class ReplayQuery(BaseModel):
    """``POST /generations/{id}/replay``: where the replay starts.

    Taken by its alias alone: ``start`` is unknown to the API, a 400 naming it, as any
    parameter the document does not list.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    found = await blocking(ledger.get, generation_id)
    if found is None:
        raise NotFound(f"generation {generation_id!r} is not in the ledger")
    return found


async def page(ledger: Ledger, query: HistoryQuery) -> GenerationPage:
    """A page of generations, newest first."""
    return await blocking(ledger.history, **query.model_dump())


async def replay(
    ledger: Ledger,
    settings: Settings,
    generation_id: str,
    query: ReplayQuery,
    *,
    idempotency_key: str | None = None,
) -> ReplayAccepted:
    """Send the recorded job (or request) of ``generation_id`` to the broker, under a new id.

    With ``idempotency_key`` (the ``Idempotency-Key`` header, IETF
    draft-ietf-httpapi-idempotency-key-header) the new id is derived from it, the generation and
    the starting point: a POST retried with the same key sends the same event (its id and
    generation), which the broker's consumers take once; without one, each POST is a replay.

    Raises:
        InvalidRequest: an ``Idempotency-Key`` that is not 1-255 printable ASCII characters.
        NotFound: the generation, or the event to replay, is not recorded.
        NotReplayable: the recorded event is invalid (409).
        ConfigurationError: no broker to send to (``K_SINK``).
        DependencyUnavailable: the broker did not accept the event.
    """
    import httpx
    from cloudevents.conversion import to_binary
    from cloudevents.http import CloudEvent

    from imagegen.ledger.replay import replay_job, replay_request

    new_id = None
    if idempotency_key is not None:
        new_id = replay_id(generation_id, query.start, _checked_key(idempotency_key))
    if query.start == "enhanced":
        data: BaseModel = await blocking(replay_job, ledger, generation_id, new_id=new_id)
        event_type = PROMPT_ENHANCED
    else:
        data = await blocking(replay_request, ledger, generation_id, new_id=new_id)
        event_type = GENERATION_REQUESTED
    if not settings.sink_url:
        raise ConfigurationError(
            "no broker to send the replay to: set IMAGEGEN_SINK_URL (on Knative, a SinkBinding"
            " sets K_SINK)",
            errors=[{"field": "IMAGEGEN_SINK_URL", "message": "required to replay"}],
        )
    new_id = str(data.generation_id)  # type: ignore[attr-defined]
    attributes = {
        "type": event_type,
        "source": source_for("ledger"),
        "id": reply_id(new_id, event_type),
        "subject": new_id,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "dataschema": dataschema(event_type),
        **routing_attributes(data),  # render's Triggers route prompt.enhanced by model
        # The replay goes on in its caller's trace, from the request's span, as a stage's reply
        # event does (the CloudEvents Distributed Tracing extension).
        **trace_extension(),
    }
    headers, body = to_binary(CloudEvent(attributes, data.model_dump(mode="json")))
    # Each attribute's header percent-encoded (HTTP binding, section 3.1.3.2), as a stage's
    # reply has it: a tracestate member "x=%41" reaches the broker as it is, not as "x=A".
    headers = {k: header_value(v) if k.startswith("ce-") else v for k, v in headers.items()}
    token = await blocking(_sink_token, settings.sink_token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            answer = await client.post(settings.sink_url, headers=headers, content=body)
    except httpx.TimeoutException:
        raise DependencyUnavailable(
            "the broker did not answer within 10 s (the replay may have been accepted)",
            retry_after=5,
        ) from None
    except httpx.HTTPError as exc:
        why = first_line(exc)
        raise DependencyUnavailable(f"the broker is unreachable: {why}", retry_after=5) from None
    _check_broker_answer(answer.status_code)
    return ReplayAccepted.model_validate(
        {
            "generation_id": new_id,
            "replay_of": generation_id,
            "from": query.start,
            "event_type": event_type,
            "event_id": attributes["id"],
        }
    )


def replay_id(generation_id: str, start: str, key: str) -> str:
    """The new generation id of the replay ``key`` names: the same for every retry of it, as a
    request event's is for its source and id."""
    return derive_generation_id(f"imagegen:replay:{generation_id}:{start}", key)


def _checked_key(key: str) -> str:
    if not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
        why = "1-255 printable ASCII characters"
        raise InvalidRequest(
            f"Idempotency-Key: must be {why}",
            errors=[{"field": "Idempotency-Key", "message": why}],
        )
    return key


def _check_broker_answer(status: int) -> None:
    """Raise what a broker's answer to the replay means for its caller; a 2xx is accepted.

    The broker's ingress answers 202 for an accepted event, 400 for one it cannot read, 401 or
    403 for a token it refuses (authentication-oidc, an EventPolicy), 404 for no such broker,
    429 or 5xx when it cannot take it now (knative/eventing pkg/broker/ingress/ingress_handler.go).
    Only the last are worth the caller's retry: the others wait for an operator.
    """
    if 200 <= status < 300:
        return
    said = f"the broker answered {status} to the replay"
    if status in (401, 403, 404):
        why = "its K_SINK, or the token for it, is refused"
        raise ConfigurationError(f"{said}: {why}", errors=[{"field": "sink_url", "message": why}])
    if status == 429 or status >= 500:
        raise DependencyUnavailable(said, retry_after=5)
    raise InternalError(f"{said}: the event was refused")


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
