"""ledger: records every imagegen event once; status, history, webhooks (CPU, no reply).

Subscribed by one Trigger per imagegen event type; it replies nothing, so it never continues
or forks the chain (a permanent failure is a 4xx, which Knative dead-letters). Events come from
the broker alone: ``POST /`` takes its OIDC token, never an API key, which would let a platform
service write any event into a generation's record (a webhook, an image URL). Its routes
answer ``GET /generations/{id}``, ``GET /generations`` and ``POST /generations/{id}/replay``
(:mod:`imagegen.ledger.api`). Each event is recorded by ``source`` + ``id``
and folded into its generation's row (:mod:`imagegen.ledger`); a redelivery changes nothing
and is answered like the first delivery. Webhook messages the event makes due are sent from
this process's dispatcher when ``IMAGEGEN_WEBHOOK_SECRETS`` is set; it stops as the process
exits (a worker at SIGTERM), letting the sends under way end and giving back what it
claimed and did not send. Without the secrets the messages are still written, and wait: said
at start-up and at the first event that names a webhook, and counted in the backlog gauge.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from imagegen.auth.callers import BROKER
from imagegen.errors import ImageGenError, InvalidRequest
from imagegen.events import (
    GENERATION_FAILED,
    GENERATION_REQUESTED,
    IMAGE_DERIVED,
    IMAGE_PERSISTED,
    IMAGE_RENDERED,
    PROMPT_ENHANCED,
)
from imagegen.identity import event_time
from imagegen.stages import Call, Route, RouteCall, Stage
from imagegen.validation import parse_model

if TYPE_CHECKING:
    from pydantic import BaseModel

    from imagegen.ledger import Ledger
    from imagegen.ledger.outbox import Dispatcher
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

log = logging.getLogger("imagegen.ledger")

_opened: dict[str, tuple[Ledger, Dispatcher | None]] = {}
_unsent_said = threading.Event()  # whether an event naming a webhook, unsent, was said
_unsent_counted: set[str] = set()  # the ledgers whose unsent messages the backlog gauge reads
_failed: dict[str, tuple[float, ImageGenError]] = {}
_lock = threading.Lock()

REOPEN_AFTER = 5.0
"""Seconds a failed opening is the answer, at once, before the next request tries again."""
TIMEOUT_S = 30.0
"""Seconds the function takes over an event or a query before it answers a retryable 503."""
SQLITE_BUSY_SHARE = 2 / 3
"""The share of :data:`TIMEOUT_S` a SQLite ledger's write waits for a lock another process
holds (its busy timeout, 20 s): held longer, the write is answered as a lock not granted
(``Retry-After: 1``, as PostgreSQL's), before the function's own time runs out, with the rest
left for the write itself once granted. Counted from when the event came, the time it waited
for a thread to run on included (:meth:`~imagegen.ledger.Ledger.ingest`'s ``deadline``). The
command line keeps the ledger's own (30 s), counted from the write."""


def sqlite_busy_timeout() -> float:
    """Seconds the function's SQLite ledger waits for another process's lock."""
    return TIMEOUT_S * SQLITE_BUSY_SHARE


def _key(settings: Settings) -> str:
    return settings.ledger_url.get_secret_value() if settings.ledger_url else ""


def ledger_of(settings: Settings) -> tuple[Ledger, Dispatcher | None]:
    """This process's ledger (and webhook dispatcher) for ``settings``, opened once.

    Blocking the first time (the database is connected to and migrated, waiting up to the
    pool's timeout while it is down): called off the event loop, as :func:`_ledger` does.
    One opening at a time; one that failed is every request's answer for
    :data:`REOPEN_AFTER` seconds, so that while the database is down the requests queued
    behind an opening, and those after, are answered 503 at once rather than each waiting out
    an opening of its own (ten seconds each, in turn, past the request's time budget).
    """
    from imagegen.ledger import open_ledger
    from imagegen.ledger.outbox import Dispatcher
    from imagegen.ledger.webhooks import AddressPolicy, WebhookSender
    from imagegen.telemetry import observe

    key = _key(settings)
    url = key or None
    with _lock:
        if key not in _opened:
            failed = _failed.get(key)
            if failed is not None and time.monotonic() - failed[0] < REOPEN_AFTER:
                raise copy.copy(failed[1])  # a copy: each raise adds to its traceback
            try:
                # A PostgreSQL database has no busy timeout: its limits are its own (lock_timeout).
                ledger = open_ledger(url, busy_timeout=sqlite_busy_timeout())
            except ImageGenError as exc:
                _failed[key] = (time.monotonic(), exc)
                raise
            _failed.pop(key, None)
            dispatcher = None
            if settings.webhook_secrets:
                sender = WebhookSender(
                    [s.get_secret_value() for s in settings.webhook_secrets],
                    AddressPolicy(tuple(settings.webhook_allowed)),
                    timeout=settings.webhook_timeout,
                )
                dispatcher = Dispatcher(ledger, sender, max_attempts=settings.webhook_max_attempts)
                dispatcher.start()
            else:
                # Messages are still written (a request's webhook is part of its record), and
                # wait: the backlog gauge counts them, so its alert fires as they pile up.
                log.warning(
                    "webhooks are off (%s is not set): messages that requests ask for are "
                    "recorded and not sent until it is",
                    settings.variable("webhook_secrets"),
                )
                if key not in _unsent_counted:
                    _unsent_counted.add(key)
                    observe("webhook_backlog", functools.partial(_unsent, key))
            _opened[key] = (ledger, dispatcher)
        return _opened[key]


def _unsent(key: str) -> int | None:
    """The backlog of the ledger opened for ``key`` without a dispatcher (webhooks off); None
    where it is not open now, or has a dispatcher (which reports its own)."""
    from imagegen.ledger.outbox import backlog

    opened = _opened.get(key)
    if opened is None or opened[1] is not None:
        return None
    return backlog(opened[0])


async def _ledger(service: ImageGenService) -> tuple[Ledger, Dispatcher | None]:
    """The process's ledger: at once once opened, else opened on a worker thread."""
    opened = _opened.get(_key(service.settings))
    if opened is not None:
        return opened
    from imagegen.ledger.api import blocking

    return await blocking(ledger_of, service.settings)


async def _start(service: ImageGenService) -> None:
    """A ledger in a local file is opened (created, migrated) before the function says ready.

    A path that cannot hold one would otherwise fail every event of a ready process, and a
    rollout that set it would replace a working revision. A database server is left to the
    warm-up, as object storage is left to the first request: one down at start-up would keep
    the process unready after it comes back.
    """
    from imagegen.errors import ConfigurationError
    from imagegen.ledger import backend

    name = service.settings.variable("ledger_url")
    try:
        local = backend(_key(service.settings) or None) == "sqlite"
    except InvalidRequest as exc:
        raise ConfigurationError(f"{name}: {exc.message}", errors=exc.errors) from None
    if not local:
        from imagegen.ledger.postgres import read_url

        try:
            read_url(_key(service.settings))  # no connection: a URL that cannot work, said now
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc.message}", errors=exc.errors) from None
        return
    try:
        await _ledger(service)
    except ConfigurationError as exc:
        # Said to callers: the setting named, never its value (ConfigurationError's rule).
        why = "; ".join(error["message"] for error in exc.errors) or "unusable"
        raise ConfigurationError(f"{name}: the ledger file {why}", errors=exc.errors) from None


async def _warm_up(service: ImageGenService) -> None:
    # The database connected to, migrated, and the webhook dispatcher started before the first
    # event needs them; a database that is down is said in the log now.
    await _ledger(service)


async def _record(service: ImageGenService, data: Any, call: Call) -> None:
    from imagegen.ledger import LedgerEvent
    from imagegen.ledger.api import blocking

    # The lock's share of the function's time, counted from now: the write may first wait for
    # a thread (the ledger's threads are fewer than a replica's concurrent requests),
    # and a busy timeout counted only from there would run past the function's own time.
    lock_deadline = time.monotonic() + sqlite_busy_timeout()
    attributes = call.attributes
    missing = [name for name in ("source", "id", "type") if not attributes.get(name)]
    if missing:
        raise InvalidRequest(
            "the ledger records CloudEvents: " + ", ".join(missing) + " missing",
            errors=[{"field": name, "message": "required attribute"} for name in missing],
        )
    if not isinstance(data, dict):
        raise InvalidRequest(
            "event data must be a JSON object",
            errors=[{"field": "data", "message": "not an object"}],
        )
    # Validated like any input. An attribute past what the ledger keeps (an id over 1,024
    # characters) or holding what a CloudEvents String must not (a NUL, a lone surrogate) never
    # gets here: the binding refuses it at every stage alike, the ledger too, with a 400 naming
    # it (functions/_binding.py), final for Knative, which dead-letters the event.
    event = parse_model(
        LedgerEvent,
        {
            "source": attributes["source"],
            "id": attributes["id"],
            "type": attributes["type"],
            "subject": attributes.get("subject"),
            # Read as every stage reads it, so the ledger records the events the chain accepts.
            "time": event_time(attributes),
            "data": data,
        },
    )
    ledger, dispatcher = await _ledger(service)
    await blocking(ledger.ingest, event, deadline=lock_deadline)
    if dispatcher is not None:
        dispatcher.wake()
    elif data.get("webhook") and not _unsent_said.is_set():
        _unsent_said.set()  # once a process: every such event would say the same
        log.warning(
            "an event names a webhook and webhooks are off (%s is not set): its messages wait",
            service.settings.variable("webhook_secrets"),
            extra={"generation_id": call.generation_id},
        )


async def _detail(service: ImageGenService, call: RouteCall) -> BaseModel:
    from imagegen.ledger import api

    ledger, _ = await _ledger(service)
    return await api.detail(ledger, call.params["generation_id"])


async def _page(service: ImageGenService, call: RouteCall) -> BaseModel:
    from imagegen.ledger import api

    ledger, _ = await _ledger(service)
    assert isinstance(call.query, api.HistoryQuery)
    return await api.page(ledger, call.query)


async def _replay(service: ImageGenService, call: RouteCall) -> BaseModel:
    from imagegen.ledger import api

    ledger, _ = await _ledger(service)
    assert isinstance(call.query, api.ReplayQuery)
    return await api.replay(
        ledger,
        service.settings,
        call.params["generation_id"],
        call.query,
        idempotency_key=call.headers.get("idempotency-key"),
    )


def _routes() -> tuple[Route, ...]:
    from imagegen.ledger.api import HistoryQuery, ReplayAccepted, ReplayQuery
    from imagegen.ledger.models import GenerationDetail, GenerationPage

    unknown = {404: "No such generation (or no recorded event to replay)."}
    # InternalError (500, never retryable): a row another program, a newer version or a damaged
    # disk wrote, named but never half-read (docs/ledger.md).
    unreadable = "The ledger cannot read the generation's record, or an event of it; named"
    return (
        Route(
            method="GET",
            path="/generations/{generation_id}",
            operation_id="generation",
            summary="One generation: status, timeline with stage durations, URLs, error.",
            handler=_detail,
            response_model=GenerationDetail,
            errors={**unknown, 500: f"{unreadable}."},
        ),
        Route(
            method="GET",
            path="/generations",
            operation_id="generations",
            summary="Generations newest first, filtered; keyset pages (next_cursor).",
            handler=_page,
            response_model=GenerationPage,
            query_model=HistoryQuery,
            errors={
                400: "A query parameter is invalid; each is named.",
                500: "The ledger cannot read where the page's last generation is listed, so no "
                "next page can start after it; named. (Other unreadable rows are left out.)",
            },
        ),
        Route(
            method="POST",
            path="/generations/{generation_id}/replay",
            operation_id="replay",
            summary="Generate again from the record, under a new id linked to the original.",
            handler=_replay,
            response_model=ReplayAccepted,
            query_model=ReplayQuery,
            status=202,
            errors={
                **unknown,
                400: "A query parameter is unknown, repeated or invalid (`from` is neither "
                "enhanced nor requested), or the `Idempotency-Key` header is not 1-255 printable "
                "ASCII characters, or a body was sent (`body`: `from` is a query parameter); "
                "each is named.",
                409: "The recorded event cannot be replayed (it was invalid); its fields named.",
                500: f"{unreadable}; or the broker refused the event as one it cannot read (its "
                "400). Not worth a retry.",
            },
            headers={
                "Idempotency-Key": {
                    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
                    "description": "The same key, generation and `from` make the same replay: "
                    "one new id, and a retry sends the same event again, which the stages take "
                    "once. Without it, each call is a new replay.",
                }
            },
        ),
    )


STAGE = Stage(
    name="ledger",
    summary="Record an imagegen event once; the generation's status moves forward.",
    consumes=(
        GENERATION_REQUESTED,
        PROMPT_ENHANCED,
        IMAGE_RENDERED,
        IMAGE_PERSISTED,
        IMAGE_DERIVED,
        GENERATION_FAILED,
    ),
    emits=None,
    input_model=None,
    output_model=None,
    handler=_record,
    timeout=lambda settings: TIMEOUT_S,
    routes=_routes(),
    start=_start,
    warm_up=_warm_up,
    callers=BROKER,  # the routes, queries and replays, take API keys too
)
