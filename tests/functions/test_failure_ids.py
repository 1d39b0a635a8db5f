"""A ``generation.failed`` has one id per failing event: two events never share one, and a
redelivery of one event is answered with the id it had."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, reply_attributes
from imagegen.models import ErrorInfo, GenerationFailed
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env

BAD = {"prompt": "a lighthouse", "width": 7}


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFunction]:
    with InProcessFunction("enhance", base_env(tmp_path_factory.mktemp("store"))) as function:
        yield function


def failed_id(enhance: InProcessFunction, source: str, event_id: str, subject: str) -> str:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": GENERATION_REQUESTED,
        "ce-source": quote(source, safe="/:"),
        "ce-id": quote(event_id),
        "ce-subject": quote(subject),
        "content-type": "application/json",
    }
    reply = enhance.post(headers=headers, content=json.dumps(BAD))
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == GENERATION_FAILED
    return reply.headers["ce-id"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # A source may hold a '#' (a URI-reference's fragment), an id any text.
        (("/a#b", "c", "gen-1"), ("/a", "b#c", "gen-1")),
        # No generation id (the subject is none) beside one, and a source with a ':'.
        (("urn:x", "c", "not a generation id"), ("x", "c", "urn")),
    ],
)
def test_two_failing_events_get_two_ids(
    enhance: InProcessFunction, first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    one, other = failed_id(enhance, *first), failed_id(enhance, *second)
    assert one != other
    # Each redelivered is answered alike.
    assert failed_id(enhance, *first) == one
    assert failed_id(enhance, *second) == other


def test_a_failure_keeps_its_id_where_its_name_was_unambiguous() -> None:
    """A redelivery across an upgrade keeps its reply's id: uuid5 of the name it always had."""
    failed = GenerationFailed(
        stage="enhance", error=ErrorInfo(code="invalid_request", message="m", retryable=False)
    )

    def named(generation_id: str | None, cause: str) -> str:
        return reply_attributes(
            "enhance", GENERATION_FAILED, failed, generation_id, {}, cause=cause
        )["id"]

    def before(name: str) -> str:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"imagegen:{name}:{GENERATION_FAILED}").hex

    assert named("gen-1", "/tests#e-1") == before("gen-1:/tests#e-1")
    assert named("gen-1", "urn:x#e:1") == before("gen-1:urn:x#e:1")
    assert named(None, "/tests#e:1") == before("/tests#e:1")
