"""The bounds the ledger sets on an event's attributes, kept by every stage alike.

The ledger keeps an event's ``id`` and ``source`` up to 1,024 characters and its ``type`` up to
256 (:mod:`imagegen.events`). A stage that took a longer one would run the generation
while the ledger refused its events, so it never learned the generation's webhook: every stage
refuses such an event with a 400 naming the attribute, in binary and structured mode alike, and
the dead-letter sink keeps it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from imagegen.events import ATTRIBUTE_MAX_LENGTHS, GENERATION_REQUESTED, IMAGE_RENDERED
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

STRUCTURED = {"content-type": "application/cloudevents+json"}
REQUEST = {"prompt": "a lighthouse", "width": 256, "height": 256, "enhance": False}


@pytest.fixture(scope="module")
def functions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InProcessFunction]]:
    store = tmp_path_factory.mktemp("store")
    env = {**base_env(store), "IMAGEGEN_LEDGER_URL": str(store / "ledger.db")}
    started = {stage: InProcessFunction(stage, env) for stage in ("enhance", "persist", "ledger")}
    yield started
    for function in started.values():
        function.close()


def send(
    function: InProcessFunction, mode: str, attributes: dict[str, str], data: Any
) -> httpx.Response:
    """POST one event in binary or structured mode; binary header values percent-encoded
    (HTTP binding, section 3.1.3.2) so that any characters travel."""
    event = {"specversion": "1.0", "type": GENERATION_REQUESTED, "source": "/tests"} | attributes
    if mode == "structured":
        return function.post(headers=STRUCTURED, json={**event, "data": data})
    headers = {f"ce-{k}": quote(v, safe="/:") for k, v in event.items()}
    return function.post(headers={**headers, "content-type": "application/json"}, json=data)


def refused_naming(reply: httpx.Response) -> set[str]:
    assert reply.status_code == 400, reply.text
    assert "ce-type" not in reply.headers
    return {e["field"] for e in reply.json()["errors"]}


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("attribute", ["id", "source"])
@pytest.mark.parametrize("char", ["x", "é"])  # characters, not bytes: "é" is two in UTF-8
def test_an_attribute_at_the_bound_is_taken_and_the_ledger_records_it(
    functions: dict[str, InProcessFunction], mode: str, attribute: str, char: str
) -> None:
    """1,024 characters: enhance answers the event, and the ledger records the same event,
    so it knows the generation and the webhook it names."""
    marker = f"{mode}-{attribute}-{ord(char)}-"
    value = marker + char * (ATTRIBUTE_MAX_LENGTHS[attribute] - len(marker))
    attributes = {"id": "bound-1", attribute: value}
    data = {**REQUEST, "webhook": "https://hooks.example.com/imagegen"}
    enhanced = send(functions["enhance"], mode, attributes, data)
    assert enhanced.status_code == 200, enhanced.text
    assert enhanced.headers["ce-type"].endswith("prompt.enhanced")
    recorded = send(functions["ledger"], mode, attributes, data)
    assert recorded.status_code < 300, recorded.text
    generation_id = enhanced.headers["ce-subject"]
    detail = functions["ledger"].get(f"/generations/{generation_id}")
    assert detail.status_code == 200, detail.text
    timeline = detail.json()["timeline"]
    assert [(e["type"], e[attribute]) for e in timeline] == [(GENERATION_REQUESTED, value)]


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("attribute", ["id", "source", "type"])
@pytest.mark.parametrize("stage", ["enhance", "persist", "ledger"])
def test_an_attribute_past_the_bound_is_refused_naming_it(
    functions: dict[str, InProcessFunction], mode: str, attribute: str, stage: str
) -> None:
    """One character more is a 400 naming the attribute and its bound, at every stage: final
    for Knative, which dead-letters the event, never run by one stage and lost by the ledger."""
    bound = ATTRIBUTE_MAX_LENGTHS[attribute]
    consumed = IMAGE_RENDERED if stage == "persist" else GENERATION_REQUESTED
    attributes = {"id": "past-1", "type": consumed, attribute: "e" * (bound + 1)}
    reply = send(functions[stage], mode, attributes, REQUEST)
    assert refused_naming(reply) == {attribute}
    assert f"at most {bound} characters" in reply.text


def test_every_attribute_past_its_bound_is_named(functions: dict[str, InProcessFunction]) -> None:
    attributes = {"id": "i" * 1025, "source": "/" + "s" * 1024, "type": "t" * 257}
    reply = send(functions["enhance"], "structured", attributes, REQUEST)
    assert refused_naming(reply) == {"id", "source", "type"}


def test_the_dead_letter_sink_keeps_an_event_past_the_bounds(tmp_path: Path) -> None:
    """The sink records whatever it is given: the event every stage refused is kept whole."""
    long_id, long_source = "d" * 1025, "/" + "s" * 1024
    with InProcessFunction("deadletter", base_env(tmp_path / "store")) as deadletter:
        binary = send(deadletter, "binary", {"id": long_id, "source": long_source}, REQUEST)
        structured = send(deadletter, "structured", {"id": long_id + "2"}, REQUEST)
    assert binary.status_code == structured.status_code == 202
    records = {
        r["event_id"]: r for r in map(json.loads, map(Path.read_text, tmp_path.rglob("*.json")))
    }
    assert set(records) == {long_id, long_id + "2"}
    assert records[long_id]["source"] == long_source
    assert records[long_id]["data"] == REQUEST
