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
from imagegen.stages import Stage

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
    },
}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry:
        response["headers"] = {
            "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}
        }
    return response


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
    if stage.output_model is not None:
        models.append((stage.output_model, "serialization"))
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
        ok = {
            "description": f"The {stage.output_model.__name__}.",
            "content": {"application/json": {"schema": _ref(stage.output_model)}},
        }
    if stage.png is not None:
        ok["content"]["image/png"] = {"schema": {"type": "string", "contentMediaType": "image/png"}}
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
                        }
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
                        "503": {
                            "description": "Not ready yet.",
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
    from imagegen.events import short_name

    return ", ".join(short_name(event_type) for event_type in stage.consumes)


def _request_body(stage: Stage, body: type[BaseModel] | None) -> dict[str, Any]:
    """``POST /``'s body: the model it validates, else what the stage takes as it comes."""
    request: dict[str, Any] = {
        "required": True,
        "content": {"application/json": {"schema": _ref(body)}},
    }
    if body is None and not _takes_anything(stage):
        request["description"] = (
            f"A CloudEvent of one of the types {_types(stage)}: in binary mode its data, each "
            "as schemas/<type>.json publishes it (the dataschema attribute), in structured "
            "mode (application/cloudevents+json) the whole event."
        )
    elif body is None:
        request["description"] = "Anything: JSON or not, an event or not."
    return request


def _responses(stage: Stage, ok: dict[str, Any]) -> dict[str, Any]:
    """The answers of ``POST /``: only those ``stage`` can give."""
    responses: dict[str, Any] = {"200" if stage.output_model is not None else "202": ok}
    if not _takes_anything(stage):
        responses["400"] = _error("Invalid input; every offending field is named. Not retried.")
    responses["401"] = _error(
        "No valid bearer token, where authentication is on; a WWW-Authenticate challenge says why."
    )
    responses["403"] = _forbidden(stage.callers)
    if not _takes_anything(stage):
        responses["413"] = _error("Body larger than 1 MiB.")
        responses["415"] = _error("Not JSON and not a CloudEvent.")
    if _refuses_at_capacity(stage):
        responses["429"] = _error("At capacity; retry after Retry-After.", retry=True)
    loading = " or the model is loading" if stage.loads_model else ""
    responses["503"] = _error(
        f"Not ready, misconfigured, a dependency unavailable{loading}.", retry=True
    )
    return responses


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
            "401": _error("No valid credentials (when authentication is required)."),
            "403": _forbidden(route.callers),
        }
        responses |= {str(status): _error(text) for status, text in route.errors.items()}
        responses["503"] = _error("The database is unavailable or start-up failed.", retry=True)
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
