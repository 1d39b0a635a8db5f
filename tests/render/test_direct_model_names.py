"""The model a direct render caller names: a served one is read, a local path included; any
other is a 400 naming ``model``, refused before render looks for it on the disk."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.render.tiny_files import save_pipeline

LONG_NAME = "m" * 256  # past NAME_MAX (255): stat-ing it is ENAMETOOLONG
UNSERVED = [
    pytest.param(LONG_NAME, id="256-characters"),
    pytest.param("/" + "m" * 300, id="long-path"),
    pytest.param("/etc", id="etc"),
    pytest.param("/proc/self", id="proc-self"),
    pytest.param("~root", id="home"),
    pytest.param("~no-such-user-here/tiny", id="no-such-user"),
    pytest.param("../../..", id="up"),
    pytest.param("a\u0000b", id="nul"),
    pytest.param("", id="empty"),
]


@pytest.fixture(scope="module")
def house_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved under a name that says nothing of it: only its files do."""
    from imagegen.render._family import build_offline

    pipe = build_offline("tiny")
    assert pipe is not None
    return save_pipeline(pipe, tmp_path_factory.mktemp("models") / "house-model")


@pytest.fixture(scope="module")
def render(
    house_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessFunction]:
    """Render serving the operator's local pipeline directory alone."""
    env = {
        **base_env(tmp_path_factory.mktemp("store")),
        "IMAGEGEN_MODEL": str(house_model),
        "IMAGEGEN_ALLOWED_MODELS": str(house_model),
    }
    with InProcessFunction("render", env) as function:
        yield function


@pytest.fixture
def disk_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path stat-ed or opened (pathlib's is_file and read_text come through here)."""
    seen: list[str] = []
    stat, open_ = os.stat, io.open

    def recording_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.fsdecode(path) if not isinstance(path, int) else str(path))
        return stat(path, *args, **kwargs)

    def recording_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(os.fsdecode(path) if not isinstance(path, int) else str(path))
        return open_(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    monkeypatch.setattr(io, "open", recording_open)
    return seen


def _request(model: str) -> dict[str, Any]:
    return {"prompt": "a red door", "width": 256, "height": 256, "seed": 3, "model": model}


@pytest.mark.parametrize("model", UNSERVED)
def test_a_model_not_served_is_a_400_naming_model_before_any_file_is_read(
    render: InProcessFunction, disk_reads: list[str], model: str
) -> None:
    for accept in ("application/json", "image/png"):
        disk_reads.clear()
        reply = render.post("/", json=_request(model), headers={"Accept": accept})

        assert reply.status_code == 400, reply.text
        body = reply.json()
        assert [e["field"] for e in body["errors"]] == ["model"]
        # Past the longest name a job may carry, it is refused as such: never looked for either.
        said = body["errors"][0]["message"]
        assert "is not served here" in said or "at most 200 characters" in said, said
        if model:
            expanded = os.path.expanduser(model) if "\0" not in model else model
            read = [p for p in disk_reads if p.startswith((model, expanded))]
            assert read == [], f"{model!r} was looked for on the disk"


def test_the_operators_local_pipeline_is_read_for_its_family(
    render: InProcessFunction, house_model: Path
) -> None:
    # A name that says nothing of the pipeline: its files make it the tiny family, whose
    # default steps (2) the reply carries, not FLUX.1 [dev]'s 28.
    reply = render.post("/", json=_request(str(house_model)))
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == str(house_model)
    assert reply.json()["steps"] == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"prompt": "a red door", "n": ' + b"9" * 5000 + b"}",
            f"holds an integer of more than {sys.get_int_max_str_digits()} digits",
        ),
        (b'\xef\xbb\xbf{"prompt": "a red door"}', "starts with a byte order mark (U+FEFF)"),
        (b'{"prompt": "a red door",}', "not valid JSON (line 1 column 25: Expecting property"),
    ],
)
def test_a_body_json_cannot_read_is_said_of_the_body(
    render: InProcessFunction, body: bytes, message: str
) -> None:
    reply = render.post("/", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    [error] = reply.json()["errors"]
    assert error["field"] == "body"
    assert error["message"].startswith(message)
