"""An event whose subject is no generation id is the event's fault: answered with a
``generation.failed`` naming what was wrong (a 2xx, never redelivered), or, where the subject
is no CloudEvents String at all, a 400 naming it (dead-lettered); never a 500."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED
from tests.conftest import CALLER_SETTINGS, isolated_settings
from tests.functions.conftest import base_env
from tests.functions.servers import FunctionServer, post_event

GOOD = {"prompt": "a red door", "width": 256, "height": 256, "enhance": False}
BAD = {**GOOD, "width": 5000}


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FunctionServer]:
    logs = tmp_path_factory.mktemp("logs")
    env = {**isolated_settings(logs), **base_env(tmp_path_factory.mktemp("store"))}
    # Started before any test's own environment is set up: the caller's settings left out here.
    with pytest.MonkeyPatch.context() as patched:
        for name in list(os.environ):
            if name.startswith(CALLER_SETTINGS):
                patched.delenv(name)
        server = FunctionServer("enhance", env, log_dir=logs)
    with server:
        yield server


# Percent-encoded, as the HTTP binding carries a ce-* header (section 3.1.3.2).
SUBJECTS = ["bad%20id", "a/b", "-a", "caf%C3%A9", "a" * 129]
# Python's "$" matches before a final newline: "bad\n" passed for a generation id, then failed
# the models. A line feed is no character of a CloudEvents String: refused before the data.
CONTROLLED = ["bad%0A", "bad%0a", "a%0A", "bad%0D%0A", "%0A"]


@pytest.mark.parametrize("subject", SUBJECTS)
def test_a_subject_that_is_no_generation_id_is_named(enhance: FunctionServer, subject: str) -> None:
    reply = post_event(enhance.url, GENERATION_REQUESTED, GOOD, subject=subject, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert "ce-subject" not in reply.headers  # an invalid id is never echoed as one
    error = reply.json()["error"]
    assert {e["field"] for e in error["errors"]} == {"subject"}
    assert error["retryable"] is False


@pytest.mark.parametrize("subject", SUBJECTS)
def test_bad_data_under_such_a_subject_is_no_500(enhance: FunctionServer, subject: str) -> None:
    # The subject names the generation.failed before the data is valid: it was a 500 here,
    # which Knative redelivers until the event is dead-lettered.
    reply = post_event(enhance.url, GENERATION_REQUESTED, BAD, subject=subject, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert "ce-subject" not in reply.headers
    assert "width" in {e["field"] for e in reply.json()["error"]["errors"]}


@pytest.mark.parametrize("subject", CONTROLLED)
@pytest.mark.parametrize("data", [GOOD, BAD])
def test_a_subject_holding_a_line_feed_is_refused_naming_it(
    enhance: FunctionServer, subject: str, data: dict[str, object]
) -> None:
    reply = post_event(enhance.url, GENERATION_REQUESTED, data, subject=subject, timeout=30)
    assert reply.status_code == 400, reply.text
    assert "ce-type" not in reply.headers
    assert {e["field"] for e in reply.json()["errors"]} == {"subject"}
    assert "U+000" in reply.json()["errors"][0]["message"]
