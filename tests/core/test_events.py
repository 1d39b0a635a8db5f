"""The ids of the events the stages answer with: stable, and defined for any text they name."""

from __future__ import annotations

import uuid

import hypothesis
import pytest
from hypothesis import strategies as st

from imagegen.events import GENERATION_FAILED, PROMPT_ENHANCED, reply_attributes, reply_id
from imagegen.models import ErrorInfo, GenerationFailed


@hypothesis.given(name=st.text(max_size=40))
@hypothesis.settings(max_examples=200, deadline=None)
def test_a_reply_id_is_uuid5_of_its_name(name: str) -> None:
    # Replies already published keep their ids: uuid5 of "imagegen:<name>:<type>", as ever.
    expected = uuid.uuid5(uuid.NAMESPACE_URL, f"imagegen:{name}:{PROMPT_ENHANCED}").hex
    assert reply_id(name, PROMPT_ENHANCED) == expected


@pytest.mark.parametrize("name", ["g-1:/s\ud800#e-1", "g-1:/s#e-\udfff", "\udc00"])
def test_a_reply_id_is_defined_for_a_name_holding_a_lone_surrogate(name: str) -> None:
    """An event's JSON may escape a lone surrogate into its source or id, which a failure's id
    is derived from: the id is the hash of the name's bytes as they came, never an error."""
    first = reply_id(name, GENERATION_FAILED)
    assert first == reply_id(name, GENERATION_FAILED) and len(first) == 32
    assert first != reply_id(name.encode("utf-8", "replace").decode(), GENERATION_FAILED)
    assert first != reply_id(name, PROMPT_ENHANCED)


def test_a_failure_of_an_event_whose_source_holds_a_lone_surrogate_has_attributes() -> None:
    failed = GenerationFailed(
        stage="render", error=ErrorInfo(code="invalid_request", message="m", retryable=False)
    )
    named = {
        source: reply_attributes(
            "render", GENERATION_FAILED, failed, "g-1", {}, cause=f"{source}#e-1"
        )["id"]
        for source in ("/s\ud800", "/s\udc00", "/s")
    }
    assert len(set(named.values())) == 3, named
