"""Generation ids: the rule decided in imagegen.identity, and the models' pattern, agree."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from imagegen.errors import InvalidRequest
from imagegen.identity import generation_id, valid_generation_id
from imagegen.models import GenerationId

VALID = ["a", "0f" * 16, "A-b_9", "x" * 128]
# Python's "$" matches before a final "\n" as well as at the end: re.match took "id\n".
INVALID = ["", "id\n", "a\n", "id\r\n", "\nid", "id\n\n", "x" * 129, "-a", "a.b", "../etc", "a b"]


@pytest.mark.parametrize("value", VALID + INVALID)
def test_the_rule_and_the_models_pattern_agree(value: str) -> None:
    try:
        TypeAdapter(GenerationId).validate_python(value)
    except ValidationError:
        modelled = False
    else:
        modelled = True
    assert valid_generation_id(value) is modelled is (value in VALID)


@pytest.mark.parametrize("subject", ["id\n", "a\n"])
def test_a_subject_ending_in_a_newline_is_refused_naming_it(subject: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generation_id(None, {"subject": subject}, starts=True)
    assert [e["field"] for e in refused.value.errors] == ["subject"]
