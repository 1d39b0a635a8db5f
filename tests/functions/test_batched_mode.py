"""What the binding refuses says what it refuses: batched mode by its name, a required attribute
at fault in the singular or plural it takes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from imagegen.events import GENERATION_REQUESTED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

BATCH = "application/cloudevents-batch+json"
EVENT = {"specversion": "1.0", "type": GENERATION_REQUESTED, "source": "/t", "id": "b-1"}


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFunction]:
    with InProcessFunction("enhance", base_env(tmp_path_factory.mktemp("store"))) as function:
        yield function


@pytest.mark.parametrize("with_headers", [False, True])
def test_a_batch_is_a_415_saying_batched_mode_is_not_supported(
    enhance: InProcessFunction, with_headers: bool
) -> None:
    """HTTP binding, section 3.3: a batch, with ce-* headers beside it or not, is refused for
    being one, not for its data's content type."""
    headers = {"content-type": BATCH}
    if with_headers:
        headers |= {f"ce-{name}": value for name, value in EVENT.items()}
    reply = enhance.post(headers=headers, content=json.dumps([{**EVENT, "data": {}}]))
    assert reply.status_code == 415, reply.text
    body = reply.json()
    assert "batched mode is not supported" in body["message"]
    assert [e["field"] for e in body["errors"]] == ["content-type"]


@pytest.mark.parametrize(
    ("empty", "said"),
    [
        (("id",), "id must be a non-empty string"),
        (("id", "source"), "id, source must be non-empty strings"),
    ],
)
def test_an_empty_required_attribute_is_named_in_its_number(
    enhance: InProcessFunction, empty: tuple[str, ...], said: str
) -> None:
    envelope = {**EVENT, **dict.fromkeys(empty, ""), "data": {"prompt": "a fox"}}
    reply = enhance.post(
        headers={"content-type": "application/cloudevents+json"}, content=json.dumps(envelope)
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["message"] == f"not a valid CloudEvent: {said}"
    assert [e["field"] for e in reply.json()["errors"]] == list(empty)
