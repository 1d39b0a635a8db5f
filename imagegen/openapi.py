"""OpenAPI 3.1 documents of the plain-HTTP surface of each function, built from the registry.

``python -m imagegen.openapi docs/openapi`` writes them; a test fails when they drift, and checks
real responses against them. Each function also serves its own at ``GET /openapi.json``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from imagegen import __version__, stages
from imagegen.auth.callers import Caller
from imagegen.events import (
    GENERATION_FAILED,
    MODEL_ATTRIBUTE,
    routing_attributes,
    short_name,
    source_for,
)
from imagegen.identity import GENERATION_ID_PATTERN
from imagegen.models import GenerationFailed
from imagegen.stages import Route, Stage

__all__ = ["document", "render_documents", "write_documents"]

_ERROR = {
    "type": "object",
    "required": ["error", "message", "retryable"],
    "properties": {
        "error": {
            "type": "string",
            "description": "Stable code, e.g. invalid_request, overloaded.",
        },
        "message": {"type": "string"},
        "retryable": {"type": "boolean"},
        "retry_after": {"type": "number"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "errors_left_out": {
            "type": "integer",
            "minimum": 1,
            "description": "How many offending fields ``errors`` does not name: a delivered"
            " error's body is cut to fit a broker's log (docs/functions.md).",
        },
    },
}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = _retry_after()
    return response


def _retry_after() -> dict[str, Any]:
    return {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}


def _challenged(response: dict[str, Any]) -> dict[str, Any]:
    """A 401 or 403 with its RFC 6750 challenge, which every such answer carries
    (:class:`~imagegen.errors.Unauthenticated`, :class:`~imagegen.errors.Forbidden`)."""
    challenge = {
        "required": True,
        "schema": {"type": "string"},
        "description": 'Bearer realm="imagegen", with error="invalid_token" (a token that does '
        'not verify) or error="insufficient_scope" (403) where it applies.',
    }
    return {**response, "headers": {"WWW-Authenticate": challenge}}


def _headers_too_large() -> dict[str, Any]:
    """What gunicorn answers to headers past its limits, before any function code runs
    (gunicorn/workers/base.py, ``handle_error``: ``LimitRequestHeaders``; written as JSON by
    ``functions/_process.py``): any operation may get it."""
    return _error(
        "Request header fields too large (a header line over 8,188 bytes, 8,190 with its "
        "CRLF, or more than 100 headers): refused by the server before the function; the "
        "error names `headers`. Not retried."
    )


def _secured() -> list[dict[str, list[str]]]:
    """What an invocation needs: the bearer token (the probes and the document need none)."""
    return [{"bearer": []}]


def _variable(name: str) -> str:
    """The environment variable of the setting ``name``, as the documents name it."""
    from imagegen.settings import Settings

    return Settings.variables(name)[0]


def _forbidden(callers: frozenset[Caller]) -> dict[str, Any]:
    """The 403 of an operation that admits ``callers``: a valid token it does not admit."""
    refused = f"a subject outside {_variable('auth_subjects')}"
    if "api-key" not in callers:
        refused += ", or an API key"
    return _error(f"A valid token this function does not admit: {refused}.")


def _bearer(stage: Stage) -> dict[str, Any]:
    """The security scheme of every invocation of ``stage``: ``Authorization: Bearer``.

    The document is the same whatever the settings (it is committed, and served as such), so it
    declares the token required and says where it is not, and which operations take the
    broker's OIDC token only (:attr:`Stage.callers`, :attr:`Route.callers`).
    """
    from imagegen.auth import audience_for

    operations = [("POST /", stage.callers)]
    operations += [(f"{route.method} {route.path}", route.callers) for route in stage.routes]
    oidc_only = [name for name, callers in operations if "api-key" not in callers]
    token = (
        f"a Kubernetes-issued OIDC token for the audience {audience_for(stage.name)} "
        f"(unless {_variable('auth_audience')} names another)"
    )
    said = (
        f"An API key, or {token}"
        if len(oidc_only) < len(operations)
        else token[0].upper() + token[1:]
    )
    if oidc_only:
        takes = "takes" if len(oidc_only) == 1 else "take"
        said += f"; {', '.join(oidc_only)} {takes} the broker's OIDC token only, never an API key"
    return {
        "type": "http",
        "scheme": "bearer",
        "description": f"{said}. "
        f"Required where {_variable('auth_required')} is on, as it is by default with "
        f"{_variable('profile')}=prod. A missing or invalid token is a 401; a valid one this "
        "function does not admit, a 403. The probes and this document take none.",
    }


def _ref(model: type[BaseModel] | None) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"} if model is not None else {}


def document(stage: Stage) -> dict[str, Any]:
    """The OpenAPI document of ``stage``'s plain-HTTP surface."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = []
    # A plain call may leave out what only an event carries (render's direct invoke).
    body = stage.direct.model if stage.direct is not None else stage.input_model
    if body is not None:
        models.append((body, "validation"))
    if stage.input_model is not None and stage.input_model is not body:
        models.append((stage.input_model, "validation"))  # an event's data (render's job)
    if stage.output_model is not None:
        models.append((stage.output_model, "serialization"))
    if _answers_events(stage):
        models.append((GenerationFailed, "serialization"))
    models += [(route.response_model, "serialization") for route in stage.routes]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = {**defs.get("$defs", {}), "Error": _error_schema()}
    ok: dict[str, Any]
    if _takes_anything(stage):
        ok = {
            "description": "Recorded, or found already recorded (an empty body): whatever the "
            "body, JSON or not, an event or not, of any size (cut at 1 MiB)."
        }
    elif stage.output_model is None:
        ok = {"description": "Accepted; nothing to say (an empty body)."}
    else:
        ok = _answered(stage, stage.output_model)
    health = {
        "type": "object",
        "properties": {
            "stage": {"type": "string"},
            "status": {"type": "string"},
            "ready": {"type": "boolean"},
            "warm": {
                "type": "boolean",
                "description": "Readiness only: the background warm-up has ended (or there is"
                " none); a first request before then waits for part of it.",
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": f"imagegen {stage.name}",
            "version": __version__,
            "description": _about(stage),
        },
        "paths": {
            **_routes(stage),
            "/": {
                "post": {
                    "operationId": stage.name,
                    "summary": stage.summary,
                    "security": _secured(),
                    "parameters": _event_headers(stage),
                    "requestBody": _request_body(stage, body),
                    "responses": _responses(stage, ok),
                }
            },
            "/healthz": {
                "get": {
                    "operationId": f"{stage.name}_alive",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": {"application/json": {"schema": health}},
                        },
                        "431": _headers_too_large(),
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": f"{stage.name}_ready",
                    "responses": {
                        "200": {
                            "description": "Ready.",
                            "content": {"application/json": {"schema": health}},
                        },
                        "431": _headers_too_large(),
                        "503": {
                            "description": "Not ready yet.",
                            "headers": _retry_after(),
                            "content": {"application/json": {"schema": health}},
                        },
                    },
                }
            },
        },
        "components": {"schemas": schemas, "securitySchemes": {"bearer": _bearer(stage)}},
    }


def _takes_anything(stage: Stage) -> bool:
    """Whether ``POST /`` takes any body at all: a stage of no event type in particular (empty
    ``consumes``) and no input model, the dead-letter sink, keeps whatever comes, as the
    function's adapter reads it (so never a 400, 413 or 415)."""
    return not stage.consumes and stage.input_model is None


def _refuses_at_capacity(stage: Stage) -> bool:
    """Whether ``POST /`` may answer 429: only render holds jobs for its model and refuses those
    beyond its capacity (:class:`~imagegen.errors.Overloaded`, from
    :mod:`imagegen.render.stage`). The registry declares no capacity, so the narrowest rule
    that names that stage: the one stage that loads a model."""
    return stage.loads_model


def _about(stage: Stage) -> str:
    if _takes_anything(stage):
        return (
            "Takes any body: CloudEvents (binary or structured mode, valid or not) and plain "
            "JSON or bytes alike, and answers 202 with an empty body once it is recorded (or "
            "found already recorded), 503 while storage is unavailable."
        )
    if stage.emits is None:
        # An event sink (the ledger): it answers no event, and an event it cannot record is a
        # 400 the broker does not retry, but dead-letters; there is no plain invoke.
        return (
            f"Records CloudEvents (binary or structured mode) of the types {_types(stage)}, "
            "and answers 202 with an empty body once the event is recorded (or found already "
            "recorded). Plain JSON without CloudEvents attributes, an event of another type, "
            "and one whose data does not fit its type (but a generation.requested: recorded, "
            "as the request enhance refuses) are a 400 naming what is wrong. It never answers "
            "with an event."
        )
    return (
        "Plain HTTP/JSON invoke. The same endpoint accepts CloudEvents (binary or structured "
        "mode) and then replies 200 with the next event, or with a generation.failed event "
        "when the request can never succeed."
    )


def _types(stage: Stage) -> str:
    return ", ".join(short_name(event_type) for event_type in stage.consumes)


def _request_body(stage: Stage, body: type[BaseModel] | None) -> dict[str, Any]:
    """``POST /``'s body: the model it validates, else what the stage takes as it comes; and a
    structured-mode event, whose data is the event's model.

    Not required: an empty body (plain, or a binary-mode event's data) is read as ``{}``
    (``functions/_binding.py``, ``parse``), which enhance takes as a request to dream."""
    if _takes_anything(stage):
        plain = "Anything: JSON or not, an event or not."
    elif body is None:
        plain = (
            f"A CloudEvent of one of the types {_types(stage)}: in binary mode its data, each "
            "as schemas/<type>.json publishes it (the dataschema attribute), in structured "
            "mode (application/cloudevents+json) the whole event."
        )
    else:
        plain = f"The {body.__name__}, or in binary mode (the ce-* headers) the event's data"
        if stage.input_model is not None and stage.input_model is not body:
            plain += f", then a {stage.input_model.__name__} in full"
        plain += "; in structured mode (application/cloudevents+json) the whole event."
    if _takes_anything(stage):
        empty = " An empty body is recorded as it came."
    elif body is not None and _accepts_empty(body):
        empty = (
            " An empty application/json body is read as {}: a valid request, every field "
            "left to its default (each field's description says what that does)."
        )
    else:
        empty = (
            " An empty application/json body is read as {}, and refused as such: a 400 "
            "naming each field it needs."
        )
    data = stage.input_model if stage.input_model is not None else body
    return {
        "required": False,
        "description": plain + empty,
        "content": {
            "application/json": {"schema": _ref(body)},
            _STRUCTURED: {"schema": _envelope(stage, data)},
        },
    }


_STRUCTURED = "application/cloudevents+json"
"""Structured mode's media type (CloudEvents HTTP binding, section 3.2)."""

_CONTEXT_ATTRIBUTES = {
    "specversion": "The CloudEvents version: 1.0 only.",
    "id": "The event's id, unique for its source.",
    "source": "Where the event comes from.",
    "type": "The event's type.",
    "subject": "The generation the event belongs to.",
    "time": "When the event's occurrence happened (RFC 3339).",
    "dataschema": "The URL of the JSON Schema of the event's data.",
}
"""The context attributes (CloudEvents 1.0, section 3.1) a function reads or answers; binary
mode's ``datacontenttype`` is ``Content-Type``, never a ``ce-*`` header (HTTP binding,
section 3.1.3.1)."""

_EXTENSION_ATTRIBUTES = {
    "traceparent": "W3C Trace Context (the CloudEvents distributed tracing extension).",
    "tracestate": "W3C Trace Context's vendor state, beside its traceparent.",
    "dataref": "Where the data's image is stored (the CloudEvents dataref extension).",
    MODEL_ATTRIBUTE: "The model the job is for: render's Triggers route on it.",
}
_REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")


_SPACES = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""The characters Python's ``str.strip()`` takes off (those ``str.isspace()`` is true of), as a
character class ECMA-262 patterns read alike (their own ``\\s`` is another set)."""

_ANY_CASE_JSON = "".join(f"[{c.upper()}{c}]" if c.isalpha() else c for c in "application/json")
_JSON_DATA = rf"^[{_SPACES}]*({_ANY_CASE_JSON}[{_SPACES}]*)?(;[\s\S]*)?$"
"""A structured event's ``datacontenttype`` as the functions take it (``functions/_binding.py``,
``_check_envelope``): its media type, before any parameter, ``application/json`` in any case or
none at all, between spaces; any parameters after it (``; charset=utf-8``)."""


def _attribute_schema(
    name: str, types: tuple[str, ...] = (), *, generation: bool = False
) -> dict[str, Any]:
    """The schema of the attribute ``name`` of an event of ``types``; ``generation``: the
    stage reads ``subject`` as the generation's id, and refuses one that is none."""
    if name == "specversion":
        return {"type": "string", "enum": ["1.0"]}
    if name == "type" and types:
        return {"type": "string", "enum": list(types)}
    if name == "subject" and generation:
        # Empty, no generation id either: CloudEvents 1.0.2 ("subject") has it
        # non-empty where present, though a stage whose data names the id lets it pass.
        return {"type": "string", "pattern": GENERATION_ID_PATTERN}
    return (
        {"type": "string", "minLength": 1} if name in _REQUIRED_ATTRIBUTES else {"type": "string"}
    )


def _reads_generations(stage: Stage) -> bool:
    """Whether ``stage`` refuses an event whose ``subject`` is no generation id: each stage of
    an input model reads the generation from it (:func:`~imagegen.identity.identify`); an event
    sink keeps any subject as it came."""
    return stage.input_model is not None


def _extensions_of(event_types: tuple[str, ...]) -> list[str]:
    """The extension attributes the stages that emit ``event_types`` send with them."""
    names = ["traceparent", "tracestate"]
    for other in stages.all_stages():
        if other.emits in event_types or (event_types == () and other.emits is not None):
            names += [n for n in _reply_extensions(other) if n not in names]
    return names


def _reply_extensions(stage: Stage) -> list[str]:
    """The extension attributes ``stage``'s reply event carries beyond the trace context: a
    ``dataref`` where its data has a ``location`` (``functions/_adapter.py``), and the routing
    attributes :func:`~imagegen.events.routing_attributes` gives its output model."""
    model = stage.output_model
    if model is None or stage.emits is None:
        return []
    names = ["dataref"] if "location" in model.model_fields else []
    # Which attributes, not their values: an instance of the model, every field a placeholder.
    fields: dict[str, Any] = dict.fromkeys(model.model_fields, "")
    return names + sorted(routing_attributes(model.model_construct(None, **fields)))


def _event_headers(stage: Stage) -> list[dict[str, Any]]:
    """Binary mode's ``ce-*`` request headers: each attribute of the events ``stage`` takes."""
    names = [*_CONTEXT_ATTRIBUTES, *_extensions_of(stage.consumes)]
    parameters = []
    for name in names:
        described = {**_CONTEXT_ATTRIBUTES, **_EXTENSION_ATTRIBUTES}[name]
        if _takes_anything(stage):
            described += " Kept as it came, whatever the value."
        elif name in _REQUIRED_ATTRIBUTES:
            described += " Required in binary mode, where the body is the event's data."
        parameters.append(
            {
                "name": f"ce-{name}",
                "in": "header",
                "required": False,
                "description": described,
                "schema": _attribute_schema(
                    name, stage.consumes, generation=_reads_generations(stage)
                ),
            }
        )
    return parameters


def _envelope(stage: Stage, data: type[BaseModel] | None) -> dict[str, Any]:
    """A structured-mode event (the JSON event format) of the types ``stage`` takes."""
    if _takes_anything(stage):
        return {}
    attributes = {
        name: _attribute_schema(name, stage.consumes, generation=_reads_generations(stage))
        for name in _CONTEXT_ATTRIBUTES
    }
    return {
        "type": "object",
        "required": list(_REQUIRED_ATTRIBUTES),
        "properties": {
            **attributes,
            "datacontenttype": {
                "type": "string",
                "pattern": _JSON_DATA,
                "description": "application/json, in any case and with any parameters "
                "(application/json; charset=utf-8); none is JSON too.",
            },
            "data": _ref(data) if data is not None else {"type": "object"},
            "data_base64": {"type": "string", "description": "The data's JSON, in Base64."},
        },
        # An extension: a name of lower-case letters and digits, a string, number or boolean.
        "propertyNames": {"pattern": "^([a-z0-9]+|data_base64)$"},
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    }


def _accepts_empty(body: type[BaseModel]) -> bool:
    """Whether ``{}`` is a valid ``body``: every field has a default."""
    return all(not field.is_required() for field in body.model_fields.values())


def _answers_events(stage: Stage) -> bool:
    """Whether ``POST /`` answers a CloudEvent with one: the next, or a ``generation.failed``."""
    return stage.emits is not None and stage.output_model is not None


def _answered(stage: Stage, output: type[BaseModel]) -> dict[str, Any]:
    """The 200 of a stage that emits ``output``: the plain answer, or the reply event's data
    (binary mode, its attributes in ``ce-*`` headers), which is a ``generation.failed`` for a
    CloudEvent that can never succeed (``functions/_binding.py``, ``error_reply``)."""
    emitted = (stage.emits or "", GENERATION_FAILED)
    ok: dict[str, Any] = {
        "description": f"The {output.__name__}: the answer to plain JSON, or the data of the "
        f"{short_name(emitted[0])} event answering a CloudEvent (binary mode, its attributes "
        "in the ce-* headers). A CloudEvent that can never succeed is answered 200 with a "
        "generation.failed event instead, its data a GenerationFailed naming the stage and "
        "every offending field.",
        "headers": _reply_headers(stage, emitted),
        "content": {
            "application/json": {
                "schema": {"oneOf": [_ref(output), _ref(GenerationFailed)]},
            }
        },
    }
    if stage.png is not None:
        ok["description"] += (
            " With Accept: image/png, for plain JSON, the PNG itself and its X-Imagegen-* "
            "headers; nothing is stored."
        )
        ok["content"]["image/png"] = {"schema": {"type": "string", "contentMediaType": "image/png"}}
        # Set by render's PNG handler (imagegen/stages/render.py), on every image/png answer.
        ok["headers"] |= {
            name: {
                "required": False,
                "schema": {"type": "string"},
                "description": f"With image/png, always: {what}.",
            }
            for name, what in (
                ("X-Imagegen-Generation-Id", "the generation id"),
                ("X-Imagegen-Seed", "the seed the image was drawn with"),
                ("X-Imagegen-Model", "the model that drew it"),
            )
        }
    return ok


def _reply_headers(stage: Stage, emitted: tuple[str, str]) -> dict[str, Any]:
    """The ``ce-*`` headers of the reply event (binary mode), sent only to a CloudEvent."""
    schemas = {
        "specversion": {"type": "string", "enum": ["1.0"]},
        "type": {"type": "string", "enum": list(emitted)},
        "source": {"type": "string", "enum": [source_for(stage.name)]},
        # Only ever a generation's id: one that is none is named by no reply.
        "subject": _attribute_schema("subject", generation=True),
    }
    when = {
        "subject": " Where the generation is known.",
        "time": " Where its data has a time (none for a failure of an event without one).",
        "dataref": f" On {stage.emits and short_name(stage.emits)} only.",
    }
    names = [*_CONTEXT_ATTRIBUTES, "traceparent", "tracestate", *_reply_extensions(stage)]
    return {
        f"ce-{name}": {
            "required": False,
            "schema": schemas.get(name, {"type": "string"}),
            "description": "The reply event's attribute, in answer to a CloudEvent: "
            + {**_CONTEXT_ATTRIBUTES, **_EXTENSION_ATTRIBUTES}[name]
            + when.get(name, ""),
        }
        for name in names
    }


def _responses(stage: Stage, ok: dict[str, Any]) -> dict[str, Any]:
    """The answers of ``POST /``: only those ``stage`` can give."""
    responses: dict[str, Any] = {"200" if stage.output_model is not None else "202": ok}
    if not _takes_anything(stage):
        responses["400"] = _error("Invalid input; every offending field is named. Not retried.")
    else:
        # The sink keeps any body it can read; the server refuses first what it cannot parse.
        responses["400"] = _error(
            "A malformed request, refused by the server before the function (a header that "
            "may come once given twice, such as Content-Length; a bad request line), or a body "
            "that cannot be read (a malformed chunk); the error names `headers`, `request` or "
            "`body`. Not retried."
        )
    responses["401"] = _challenged(
        _error(
            "No valid bearer token, where authentication is on; the WWW-Authenticate "
            "challenge says why."
        )
    )
    responses["403"] = _challenged(_forbidden(stage.callers))
    if not _takes_anything(stage):
        responses["413"] = _error("Body larger than 1 MiB.")
        responses["415"] = _error("Not JSON and not a CloudEvent.")
    if _refuses_at_capacity(stage):
        responses["429"] = _error("At capacity; retry after Retry-After.", retry=True)
    responses["431"] = _headers_too_large()
    loading = " or the model is loading" if stage.loads_model else ""
    responses["503"] = _error(
        f"Not ready, misconfigured, a dependency unavailable{loading}.", retry=True
    )
    return responses


def _unavailable(route: Route) -> str:
    """What a 503 of ``route`` means: each route reads the ledger's database; one that sends
    an event on (a ``POST``: the replay) needs the broker too, its usual 503."""
    database = "the database is unavailable, or start-up failed"
    if route.method == "POST":
        return (
            "The broker (K_SINK) is unreachable, did not answer within 10 s, or answered 429 "
            "or 5xx, so no event was sent (retry with the same Idempotency-Key to send the "
            f"same one); no K_SINK is set, or the broker refuses it or its token; or {database}."
        )
    return f"The {route.response_model.__name__} cannot be read now: {database}."


def _routes(stage: Stage) -> dict[str, Any]:
    """The paths of the stage's own routes: parameters from the query model, JSON answers."""
    paths: dict[str, Any] = {}
    for route in stage.routes:
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.parameters
        ]
        if route.query_model is not None:
            schema = route.query_model.model_json_schema(by_alias=True)
            for name, field in schema.get("properties", {}).items():
                field = {k: v for k, v in field.items() if k != "title"}
                description = field.pop("description", None)
                parameter = {"name": name, "in": "query", "required": False, "schema": field}
                if description:
                    parameter["description"] = description
                parameters.append(parameter)
        parameters += [
            {"name": name, "in": "header", "required": False, **spec}
            for name, spec in route.headers.items()
        ]
        responses: dict[str, Any] = {
            str(route.status): {
                "description": route.response_model.__doc__.strip().splitlines()[0]
                if route.response_model.__doc__
                else route.response_model.__name__,
                "content": {"application/json": {"schema": _ref(route.response_model)}},
            },
            # Every route refuses a query parameter it does not take, or one given twice.
            "400": _error("A query parameter is unknown, repeated or invalid; each is named."),
            "401": _challenged(_error("No valid credentials (when authentication is required).")),
            "403": _challenged(_forbidden(route.callers)),
            "431": _headers_too_large(),
        }
        responses |= {str(status): _error(text) for status, text in route.errors.items()}
        responses["503"] = _error(route.errors.get(503) or _unavailable(route), retry=True)
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": route.summary,
            "security": _secured(),
        }
        if parameters:
            operation["parameters"] = parameters
        operation["responses"] = dict(sorted(responses.items()))
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return paths


def _error_schema() -> dict[str, Any]:
    return copy.deepcopy(_ERROR)


def render_documents() -> dict[str, str]:
    return {
        f"{stage.name}.json": json.dumps(document(stage), indent=2, sort_keys=True) + "\n"
        for stage in stages.all_stages()
    }


def write_documents(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render_documents().items():
        (directory / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_documents(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/openapi"))
