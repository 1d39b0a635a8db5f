"""schemathesis against each function's own ``/openapi.json``: every answer is documented.

Requests are generated from the document each function serves (valid and invalid bodies,
every operation), sent to the function in this process, and each answer is checked: never a
server error, a documented status, content type, headers, and a body of the documented
schema.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.functions.clients import InProcessFunction
from tests.fuzz.conftest import FUZZ, STAGES

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 30  # per operation and function: the hostile inputs are tests/fuzz's other tests


def _small_render(case: Any) -> Any:
    """A render job within the document, small and under one generation id: the first valid
    job renders, later ones are answered from storage or refused as another job (400)."""
    if isinstance(case.body, dict):
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
