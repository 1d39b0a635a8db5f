"""The stage registry: each stage is one module of this package, declaring one :class:`Stage`.

A stage module (``enhance.py``, ``render.py``, ...) defines ``STAGE``; nothing else lists the
stages. Event types, JSON Schemas, OpenAPI documents, the CLI's ``serve`` choices,
``GenerationFailed.stage`` and the manifest tests all read this registry. Listing the names
imports no stage module, so :mod:`imagegen.models` can use them without a cycle.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, get_args

from imagegen.auth.callers import ANY_CALLER, Caller

if TYPE_CHECKING:
    from pydantic import BaseModel

    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = ["Call", "Direct", "Handler", "Route", "RouteCall", "Stage", "all_stages", "get", "names"]


@dataclass(frozen=True, kw_only=True)
class Call:
    """What a stage knows of the request besides its data, decided once by the caller.

    Attributes:
        generation_id: The generation the request belongs to (None: not known, the sink).
        requested_at: The request's time, for a stage that starts generations.
        attributes: The CloudEvents attributes as received (empty for plain HTTP).
        headers: The HTTP headers as received, names lower-cased (given to the sink).
        raw: The body as received where it could not be read as JSON (given to the sink).
    """

    generation_id: str | None = None
    requested_at: datetime | None = None
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    raw: bytes | None = None


Handler = Callable[["ImageGenService", Any, Call], Awaitable["BaseModel | None"]]


@dataclass(frozen=True, kw_only=True)
class Direct:
    """What a plain-HTTP body (no event) may leave out, and how the stage fills it in.

    Attributes:
        model: The body's model: the plain-HTTP surface (the OpenAPI document shows it).
        complete: ``complete(settings, body)`` → the stage's input, with what a direct caller
            cannot know (a generation id, the served model, the time) filled in.
    """

    model: type[BaseModel]
    complete: Callable[[Settings, Any], BaseModel]


@dataclass(frozen=True, kw_only=True)
class RouteCall:
    """One request to a :class:`Route`: its path parameters, its validated query, and its
    headers (names in lower case)."""

    params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    query: BaseModel | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


_PARAMETER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, kw_only=True)
class Route:
    """An HTTP route a stage serves beside ``POST /`` (the ledger's queries, for one).

    The adapter authenticates it like ``POST /``, validates the query with ``query_model``
    (a 400 naming each field) and answers the handler's model as JSON with ``status``.

    Attributes:
        method: ``GET`` or ``POST``.
        path: A template: ``/generations/{generation_id}`` (a parameter is one path segment).
        operation_id: The OpenAPI ``operationId``.
        summary: One line for the OpenAPI document.
        handler: ``await handler(service, call)`` → the response model.
        response_model: What the handler answers.
        query_model: The query parameters, validated; None: no parameters.
        status: The success status.
        errors: Documented error statuses and what each means (400, 404, ...).
        headers: Request headers it reads, each an optional OpenAPI header parameter: its
            name, and its ``schema`` and ``description`` (the handler checks the value).
        callers: The kinds of credential it accepts where authentication is on
            (:mod:`imagegen.auth.callers`); a valid one of another kind is a 403.
    """

    method: str
    path: str
    operation_id: str
    summary: str
    handler: Callable[[ImageGenService, RouteCall], Awaitable[BaseModel]]
    response_model: type[BaseModel]
    query_model: type[BaseModel] | None = None
    status: int = 200
    errors: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    callers: frozenset[Caller] = ANY_CALLER

    @property
    def parameters(self) -> tuple[str, ...]:
        return tuple(_PARAMETER.findall(self.path))

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters when ``path``, percent-decoded already, is this route's; None
        otherwise.

        The server decodes the path once (werkzeug's ``PATH_INFO``); decoding its parameters
        again would read ``%252e`` as ``.`` (RFC 3986, section 2.4: never decode twice).
        """
        literal = re.escape(self.path).replace(r"\{", "{").replace(r"\}", "}")
        found = re.fullmatch(_PARAMETER.sub(r"(?P<\1>[^/]+)", literal), path)
        return found.groupdict() if found else None


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: what it consumes and emits, its models, its handler and its limits.

    Attributes:
        name: The stage and its function (``functions`` target, Knative Service suffix).
        summary: One line for the OpenAPI document and the CLI.
        consumes: CloudEvents types accepted; empty: any event (the dead-letter sink).
        emits: The reply event type; None: no reply event (an empty 2xx).
        input_model: The request data's model; None: taken as it comes (a JSON object of an
            event of ``consumes``, checked as every stage checks events; with ``consumes``
            empty too, anything at all, as the dead-letter sink keeps it).
        output_model: The reply data's model (None when nothing is emitted).
        handler: ``await handler(service, data, call)`` → the reply data.
        timeout: Seconds a request may take (from the settings) before a retryable 503.
        loads_model: Not ready until the render model is loaded (at start).
        starts_generations: A request without a generation id gets one here (from the
            event's ``source`` + ``id``, else a new one), and its time from the event.
        png: Optional handler for a plain request with ``Accept: image/png``.
        routes: Further HTTP routes (queries of the stage's own records).
        callers: The kinds of credential ``POST /`` accepts where authentication is on
            (:mod:`imagegen.auth.callers`): an event sink, which the broker alone feeds, takes
            its OIDC token only (``BROKER``); a valid API key there is a 403.
        direct: A plain-HTTP body laxer than the event's data; None: the same ``input_model``.
        prepare: ``prepare(settings)``, once, as the settings are read, before the function
            starts: what the stage makes of them beyond their own rules, checked without
            reaching anything over the network, as arguments of the service it serves with
            (enhance: its ``plugins``, each plugin's options and settings checked). A
            :class:`~imagegen.errors.ConfigurationError` fails start-up as settings that
            cannot be read do, for good, and ``imagegen serve`` refuses to start the function.
        start: ``await start(service)``, once, at start-up: what must work before the
            function says ready (a ledger in a local file). A failure fails start-up, as broken
            settings do: readiness says so and requests are answered 503.
        warm_up: ``await warm_up(service)``, once, in the background once the function has
            turned ready: builds what a first request would otherwise build while it waits
            (imports, clients, tables). Readiness never waits for it; a failure is logged.
    """

    name: str
    summary: str
    consumes: tuple[str, ...]
    emits: str | None
    input_model: type[BaseModel] | None
    output_model: type[BaseModel] | None
    handler: Handler
    timeout: Callable[[Settings], float]
    loads_model: bool = False
    starts_generations: bool = False
    png: Callable[[ImageGenService, Any], Awaitable[tuple[bytes, dict[str, str]]]] | None = None
    routes: tuple[Route, ...] = ()
    direct: Direct | None = None
    prepare: Callable[[Settings], Mapping[str, Any]] | None = None
    start: Callable[[ImageGenService], Awaitable[object]] | None = None
    warm_up: Callable[[ImageGenService], Awaitable[object]] | None = None
    callers: frozenset[Caller] = ANY_CALLER

    def callers_of(self, route: Route | None) -> tuple[frozenset[Caller], str]:
        """Who may call ``route`` (None: ``POST /``), and the route as a refusal names it: the
        arguments of :meth:`Principal.admit <imagegen.auth.Principal.admit>`."""
        if route is None:
            return self.callers, f"POST / of {self.name}"
        return route.callers, f"{route.method} {route.path} of {self.name}"

    def models(self) -> tuple[type[BaseModel], ...]:
        """The models a request to this stage may validate or write: its input (the event's
        and the plain-HTTP body's), its reply, the ``generation.failed`` that answers an event
        that cannot succeed, and the models of their fields (a plugin's ``Contribution``),
        each once."""
        from pydantic import BaseModel

        from imagegen.models import GenerationFailed

        direct = self.direct.model if self.direct is not None else None
        found: dict[type[BaseModel], None] = {}
        pending: list[Any] = [self.input_model, direct, self.output_model, GenerationFailed]
        while pending:
            kind = pending.pop(0)
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                if kind in found:
                    continue
                found[kind] = None
                pending += [field.annotation for field in kind.model_fields.values()]
            else:  # tuple[Contribution, ...], LoraHint | None, Annotated[...]: look inside
                pending += get_args(kind)
        return tuple(found)


@cache
def names() -> tuple[str, ...]:
    """The registered stages' names, from this package's modules (none is imported)."""
    return tuple(
        sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    )


def get(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
        KeyError: when no stage has that name.
    """
    if name not in names():
        raise KeyError(name)
    stage: Stage = importlib.import_module(f"{__name__}.{name}").STAGE
    return stage


def all_stages() -> tuple[Stage, ...]:
    """Every stage, in pipeline order (a stage after the one emitting what it consumes)."""
    stages = [get(name) for name in names()]
    emitted = {s.emits for s in stages}
    ordered: list[Stage] = []
    pending = [s for s in stages if s.consumes]
    # Stages that consume something no stage emits start the pipeline.
    ready = [s for s in pending if not set(s.consumes) & emitted]
    while ready:
        stage = ready.pop(0)
        ordered.append(stage)
        pending.remove(stage)
        ready += [s for s in pending if stage.emits in s.consumes and s not in ready]
    return (*ordered, *pending, *(s for s in stages if not s.consumes))
