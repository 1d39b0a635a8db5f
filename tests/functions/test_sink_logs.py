"""The dead-letter sink's line saying why a delivery failed names the generation, as the other
stages' lines and the sink's own span do: an operator searching the logs by generation finds
the record that could not be kept."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegen.events import GENERATION_FAILED
from imagegen.observability import JsonFormatter
from imagegen.stages import deadletter
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import cloudevent_headers


class _Lines(logging.Handler):
    """The functions' log lines, written as the process writes them (JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(JsonFormatter("deadletter"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Formatted here, in the request's trace context, as the stderr handler does.
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines() -> Iterator[_Lines]:
    # On the functions' logger itself: start-up sets the root logger's handlers anew.
    handler, logger = _Lines(), logging.getLogger("imagegen.functions")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def broken_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessFunction]:
    """A dead-letter sink whose storage fails every write (a file where its records go)."""
    monkeypatch.setattr(deadletter, "RETRY_FOR", 0.5)  # not the 50 s of a real outage
    store = tmp_path / "store"
    store.mkdir()
    (store / "failures").write_text("a file where the records go: storage fails")
    with InProcessFunction("deadletter", base_env(store)) as sink:
        yield sink


@pytest.mark.parametrize(
    ("extensions", "data"),
    [
        ({"subject": "g-lost-1"}, {"generation_id": "g-lost-1", "stage": "render"}),
        ({}, {"generation_id": "g-lost-1", "stage": "render"}),  # named by its data alone
    ],
    ids=["subject", "data"],
)
def test_the_line_of_a_delivery_the_sink_could_not_record_names_its_generation(
    broken_sink: InProcessFunction,
    lines: _Lines,
    extensions: dict[str, str],
    data: dict[str, str],
) -> None:
    headers = cloudevent_headers(GENERATION_FAILED, **extensions)
    reply = broken_sink.post(headers=headers, content=json.dumps(data).encode())
    assert reply.status_code == 503, reply.text
    [failed] = [line for line in lines.lines if line["message"].startswith("request failed")]
    assert failed["stage"] == "deadletter"
    assert failed["level"] == "ERROR"
    assert failed["generation_id"] == "g-lost-1"


def test_a_body_naming_no_valid_generation_logs_none(
    broken_sink: InProcessFunction, lines: _Lines
) -> None:
    # What a sink is sent may be anything: only a generation id is logged as one.
    reply = broken_sink.post(
        headers=cloudevent_headers(GENERATION_FAILED),
        content=json.dumps({"generation_id": "not an id/../"}).encode(),
    )
    assert reply.status_code == 503, reply.text
    [failed] = [line for line in lines.lines if line["message"].startswith("request failed")]
    assert "generation_id" not in failed
