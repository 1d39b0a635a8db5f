"""schemathesis against each function's own ``/openapi.json``: every answer is documented.

Requests are generated from the document each function serves, every operation, and sent to
the function in this process. Valid requests (schemathesis's positive mode): each answer is
checked, never a server error, a documented status, content type, headers, and a body of the
documented schema. Invalid ones (its negative mode: a body, query, path or header the
document refuses): never a server error or a stack trace, and an invalid body, query or path
is refused with a 4xx (or a ``generation.failed`` reply) in the functions' JSON error shape,
naming a field (a path naming no generation: a 404 that says so).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from imagegen.events import GENERATION_FAILED
from tests.functions.clients import InProcessFunction
from tests.fuzz.conftest import FUZZ, STAGES, check

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 30  # per operation and function: the hostile inputs are tests/fuzz's other tests
NEGATIVE_EXAMPLES = 10  # per operation: schemathesis draws invalid requests slowly


def _small_render(case: Any) -> Any:
    """A render job within the document, small and under one generation id: the first valid
    job renders, later ones are answered from storage or refused as another job (400). An
    invalid body is left as it is."""
    if isinstance(case.body, dict) and "body" not in _negated(case):
        case.body.update(generation_id="conformance-render", requested_at="2026-05-01T00:00:00Z")
        for name, bound in (("width", 256), ("height", 256), ("steps", 1)):
            if isinstance(case.body.get(name), int) and case.body[name] > bound:
                case.body[name] = bound
    return case


@pytest.mark.parametrize("stage", STAGES)
def test_every_answer_is_documented(functions: dict[str, InProcessFunction], stage: str) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", functions[stage].app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /", "GET /healthz", "GET /readyz"}
    called: dict[str, int] = {}
    for operation in operations:
        strategy = operation.as_strategy()
        if stage == "render":
            strategy = strategy.map(_small_render)

        @settings(FUZZ, max_examples=EXAMPLES)
        @given(case=strategy)
        def run(case: Any) -> None:
            case.call_and_validate(checks=CHECKS)
            called[operation.label] = called.get(operation.label, 0) + 1

        run()
    assert called["POST /"] >= EXAMPLES // 2, called


# What a function checks of a request itself; a header the document refuses may be one it
# does not read (``Authorization`` where no authentication is required, an unknown ``ce-``
# extension), so an answer to a refused header is only held to the rules of every answer.
CHECKED = {"body", "query", "path"}


def _negated(case: Any) -> set[str]:
    """Where ``case`` breaks the document: ``body``, ``query``, ``path``, ``header``."""
    return {
        str(location.value)
        for location, component in case.meta.components.items()
        if component.mode is GenerationMode.NEGATIVE
    }


def _as_httpx(response: Any) -> httpx.Response:
    """schemathesis's answer as httpx's, the one :func:`~tests.fuzz.conftest.check` reads."""
    sent = response.request
    return httpx.Response(
        response.status_code,
        headers=[(name, value) for name, values in response.headers.items() for value in values],
        content=response.content,
        request=httpx.Request(sent.method, sent.url),
    )


def _named_fields(response: httpx.Response) -> list[str]:
    reply = response.json()
    error = reply["error"] if isinstance(reply["error"], dict) else reply
    return [e["field"] for e in error.get("errors", [])]


@pytest.mark.parametrize("stage", STAGES)
def test_every_invalid_request_is_refused_naming_a_field(
    functions: dict[str, InProcessFunction], stage: str
) -> None:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", functions[stage].app)
    refused: dict[str, int] = {}
    for operation in (result.ok() for result in schema.get_all_operations()):
        if not (list(operation.iter_parameters()) or operation.body):
            continue  # nothing in it the document could refuse (/healthz, /readyz)
        strategy = operation.as_strategy(GenerationMode.NEGATIVE)
        if stage == "render":
            strategy = strategy.map(_small_render)

        @settings(FUZZ, max_examples=NEGATIVE_EXAMPLES)
        @given(case=strategy)
        def run(case: Any) -> None:
            response = _as_httpx(case.call())
            check(stage, response)
            if stage == "deadletter" or not _negated(case) & CHECKED:
                return  # the sink keeps whatever it is given; for a refused header, CHECKED
            if response.status_code == 200:  # a readable event that can never succeed
                assert response.headers["ce-type"] == GENERATION_FAILED, response.text[:300]
            else:
                assert 400 <= response.status_code < 500, (response.status_code, case.body)
            # A path naming no generation is not found, whatever else the request holds.
            if response.status_code != 404:
                assert _named_fields(response), response.text[:300]
            refused[operation.label] = refused.get(operation.label, 0) + 1

        run()
    if stage != "deadletter":  # an event's data the document refuses was sent, and refused
        assert refused.get("POST /", 0) > 0, refused
