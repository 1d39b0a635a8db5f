"""Hostile requests as hypothesis strategies: schema-generated, mutated, junk, abused HTTP.

Each strategy draws a :class:`Request` (method, path, headers, body) for one stage; the tests
send it and check the answer. Event data comes from the JSON Schema of the stage's input
model, from the stage registry (the same schemas ``schemas/`` publishes).
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from imagegen import stages
from imagegen.events import GENERATION_FAILED, event_models
from imagegen.plugins.discovery import discover

STRUCTURED = "application/cloudevents+json"

# Any text, lone surrogates included: JSON's "\ud800" escape is valid JSON that no UTF-8 can
# hold (RFC 8259, section 8.2). hypothesis leaves the surrogates (category Cs) out of
# ``characters()`` unless asked, and draws from a union of character sets by the number of
# characters in each (2,048 surrogates in 1.1 million: a string seldom held one); drawn apart,
# one character in four is one.
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
CHARACTERS = st.one_of(st.characters(), st.characters(), st.characters(), SURROGATES)


def text(*, min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    """Strings of any characters, about a third of them with lone surrogates among them."""
    plain = st.text(min_size=min_size, max_size=max_size)
    with_surrogates = st.lists(CHARACTERS, min_size=min_size, max_size=max_size).map("".join)
    return st.one_of(plain, plain, with_surrogates)


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/"


def consumed(stage: str) -> str:
    """The event type ``stage`` consumes (the sink: the failures it records most)."""
    found = stages.get(stage).consumes
    return found[0] if found else GENERATION_FAILED


@cache
def schema_data(stage: str) -> st.SearchStrategy[Any]:
    """Data valid under :func:`schema`, built once per stage."""
    document = schema(stage)
    return _strategy(document, document.get("$defs", {}))


def _strategy(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Objects, arrays and unions composed here, leaves from hypothesis-jsonschema.

    hypothesis-jsonschema rebuilds an object's property strategies on every draw, which
    costs ~0.1 s per event; composing them once with ``fixed_dictionaries`` draws the same
    values in a millisecond.
    """
    if "$ref" in node:
        return _strategy(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in node:
        return st.one_of([_strategy(option, defs) for option in node["anyOf"]])
    if node.get("type") == "object" and "properties" in node:
        required = set(node.get("required", ()))
        fields = {name: _strategy(sub, defs) for name, sub in node["properties"].items()}
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        items = _strategy(node["items"], defs)
        return st.lists(items, min_size=node.get("minItems", 0), max_size=node["maxItems"])
    if node.get("format") == "date-time" and "formatMinimum" in node:
        earliest, latest = (
            datetime.fromisoformat(node[bound]) for bound in ("formatMinimum", "formatMaximum")
        )
        times = st.datetimes(earliest.replace(tzinfo=None), latest.replace(tzinfo=None))
        return times.map(lambda t: t.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"))
    if node.get("type") == "string" and node.keys() <= _FREE_TEXT:
        # Free text: drawn here, lone surrogates included (a JSON Schema string may hold one).
        return text(min_size=node.get("minLength", 0), max_size=node.get("maxLength"))
    return from_schema(node)


# The keywords of a string node whose value is any text (no pattern, format or enum).
_FREE_TEXT = frozenset({"type", "title", "description", "default", "minLength", "maxLength"})


# What a free-form JSON value (``additionalProperties: true``) is drawn as: deep and wide
# values would make each example slow to draw; the mutations and junk go deep instead.
_SMALL_VALUE = {"type": ["string", "integer", "number", "boolean", "null"], "maxLength": 20}


def _bounded(node: Any) -> Any:
    """``node`` with every collection kept small, so that an example draws in milliseconds."""
    if isinstance(node, list):
        return [_bounded(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _bounded(value) for key, value in node.items()}
    if node.get("additionalProperties") is True:
        node["additionalProperties"] = _SMALL_VALUE
    if node.get("type") == "object" and "properties" not in node:
        node["maxProperties"] = min(node.get("maxProperties", 3), 3)
    if node.get("type") == "array":
        node["maxItems"] = min(node.get("maxItems", 3), 3)
    return node


@cache
def schema(stage: str) -> dict[str, Any]:
    """The JSON Schema of the data ``stage`` consumes (as ``schemas/`` publishes it), with
    free-form values and collections kept small."""
    model = stages.get(stage).input_model or event_models()[consumed(stage)]
    document: dict[str, Any] = _bounded(model.model_json_schema())
    if stage == "render":
        # A schema-valid job naming the served model renders: keep any such job tiny.
        props = document["properties"]
        props["width"]["maximum"] = props["height"]["maximum"] = 256
        props["steps"]["maximum"] = 1
        # Where the schema takes values render refuses, only those it takes, so that a share
        # of the jobs renders: no LoRA (none is configured), enhancers' and plugins' names,
        # times in the range the chain takes, and half the time the served model (a render
        # costs ~0.1 s; the other half names any model, refused).
        props["model"] = {"anyOf": [{"enum": [SERVED_MODEL]}, props["model"]]}
        props["enhancer"] = {"enum": ENHANCERS}
        props["loras"]["maxItems"] = 0
        document["$defs"]["Contribution"]["properties"]["plugin"] = {"enum": PLUGINS}
        props["requested_at"] = CHAIN_TIME
        props["enhanced_at"] = {"anyOf": [CHAIN_TIME, {"type": "null"}]}
    return document


# The model the functions under fuzz serve (tests.functions.conftest.base_env); what wrote a
# prompt, as enhance and render name it; the plugins installed here.
SERVED_MODEL = "tiny"
ENHANCERS = ["template", "passthrough", "none", "ollama:llama3.2"]
PLUGINS = sorted(discover())
# A time in the range the chain takes (imagegen.identity: from 1970, not ahead of its clock).
CHAIN_TIME = {
    "type": "string",
    "format": "date-time",
    "formatMinimum": "1970-01-01T00:00:00Z",
    "formatMaximum": "2026-01-01T00:00:00Z",
}


# A valid request of each stage; the mutations start from these. enhance skips the LLM,
# render's job is the smallest the tiny model renders. persist's and derive's are the events
# of that job's image, rendered and persisted: the fuzz's ``functions`` fixture adds them
# (their claim check names a stored image, or none of them would get past storage).
JOB = {
    "generation_id": "fuzz-job",
    "prompt": "a red door",
    "enhancer": "template",
    "model": SERVED_MODEL,
    "width": 256,
    "height": 256,
    "steps": 1,
    "guidance": 1.0,
    "seed": 3,
    "requested_at": "2026-05-01T12:00:00Z",
    "metadata": {"team": "fuzz"},
}
VALID: dict[str, dict[str, Any]] = {
    "enhance": {"prompt": "a red door", "width": 256, "height": 256, "enhance": False},
    "render": JOB,
    "deadletter": {
        "generation_id": "fuzz-job",
        "stage": "render",
        "error": {"code": "invalid_request", "message": "m", "retryable": False},
        "failed_at": "2026-05-01T12:00:00Z",
    },
    # generation.requested, the first event the ledger records of a generation.
    "ledger": {"prompt": "a red door", "width": 256, "height": 256, "enhance": False},
}
# The stages whose valid request is the reply of the stage before them, in chain order.
CHAINED = {"persist": "render", "derive": "persist"}


def binary(stage: str, body: bytes, **headers: str | None) -> Request:
    """A binary-mode event of the type ``stage`` consumes; a ``None`` header is left out."""
    sent: dict[str, str | None] = {
        "ce-specversion": "1.0",
        "ce-type": consumed(stage),
        "ce-source": "/fuzz",
        "ce-id": "fuzz-1",
        "ce-time": "2026-05-01T12:00:00Z",
        "content-type": "application/json",
        **headers,
    }
    return Request(body, {k: v for k, v in sent.items() if v is not None})


def structured(stage: str, data: bytes, **attributes: Any) -> Request:
    """A structured-mode event whose ``data`` member is ``data``, byte for byte."""
    envelope = {
        "specversion": "1.0",
        "type": consumed(stage),
        "source": "/fuzz",
        "id": "fuzz-2",
        "datacontenttype": "application/json",
        **attributes,
    }
    head = json.dumps(envelope)[:-1].encode()
    return Request(head + b', "data": ' + (data or b"null") + b"}", {"content-type": STRUCTURED})


def plain(body: bytes) -> Request:
    return Request(body, {"content-type": "application/json"})


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text(max_size=10), inner),
    max_leaves=12,
)
POISON = [
    b"[" * 1000 + b"]" * 1000,
    b'{"metadata":' + b'{"a":' * 300 + b"1" + b"}" * 301,
    b'{"a": NaN}',
    b'{"seed": Infinity}',
    b'{"metadata": {"x": -Infinity}}',
    b"\xff",
    b'{"prompt": "caf\xe9"}',
    b'{"generation_id": 5}',
    b"",
    b"null",
    b"[]",
    b'"text"',
]


@st.composite
def from_the_schema(draw: st.DrawFn, stage: str) -> list[Request]:
    """Event data drawn from the stage's JSON Schema, sent in binary, structured and plain
    form (drawing is the slow part: each draw is sent three ways)."""
    data = json.dumps(draw(schema_data(stage))).encode()
    return [binary(stage, data), structured(stage, data), plain(data)]


@st.composite
def mutated(draw: st.DrawFn, stage: str) -> Request:
    """A valid request with one field dropped, retyped or added, nested, or poisoned."""
    data: Any = copy.deepcopy(VALID[stage])
    how = draw(st.sampled_from(["drop", "replace", "add", "wrap", "deep", "poison"]))
    key = draw(st.sampled_from(sorted(data)))
    if how == "drop":
        del data[key]
    elif how == "replace":
        data[key] = draw(JSON_VALUES)
    elif how == "add":
        data[draw(text(min_size=1, max_size=12))] = draw(JSON_VALUES)
    elif how == "wrap":
        data = draw(st.sampled_from([{"data": data}, [data], {key: data}]))
    if how == "deep":
        depth = draw(st.integers(min_value=8, max_value=3000))
        body = b'{"metadata":' + b'{"a":' * depth + b"1" + b"}" * (depth + 1)
    elif how == "poison":
        body = draw(st.sampled_from(POISON))
    else:
        body = json.dumps(data).encode()
    how = draw(st.sampled_from(["binary", "structured", "plain"]))
    if how == "binary":
        return binary(stage, body)
    if how == "structured":  # its source or id any text: a reply's id is derived from them
        named = draw(st.sampled_from([(), ("source",), ("id",)]))
        return structured(stage, body, **{name: draw(text(min_size=1)) for name in named})
    return plain(body)


CONTENT_TYPES = [
    "application/json",
    STRUCTURED,
    "application/octet-stream",
    "text/plain",
    "",
    "application/json; charset=latin-1",
    "application/cloudevents-batch+json",
    "multipart/form-data; boundary=x",
    "application/xml",
]


@st.composite
def junk(draw: st.DrawFn, stage: str) -> Request:
    """Raw bytes under any content type, as an event or not."""
    body = draw(st.binary(max_size=512) | st.sampled_from(POISON))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if draw(st.booleans()):
        return binary(stage, body, **{"content-type": content_type})
    return Request(body, {"content-type": content_type})


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
CE_HEADERS = ["ce-specversion", "ce-type", "ce-source", "ce-id", "ce-time", "ce-subject"]


@st.composite
def abused(draw: st.DrawFn, stage: str) -> Request:
    """CloudEvents headers missing, invalid, huge or many; structured envelopes broken;
    ``data_base64``; wrong content types; odd methods and paths."""
    data = json.dumps(VALID[stage]).encode()
    kind = draw(
        st.sampled_from(
            ["missing", "invalid", "huge", "many", "type", "envelope", "base64", "route"]
        )
    )
    if kind == "missing":
        gone = draw(st.lists(st.sampled_from(CE_HEADERS[:4]), min_size=1, unique=True))
        return binary(stage, data, **dict.fromkeys(gone))
    if kind == "invalid":
        header = draw(st.sampled_from(CE_HEADERS))
        return binary(stage, data, **{header: draw(HEADER_TEXT)})
    if kind == "huge":
        header = draw(st.sampled_from([*CE_HEADERS, "ce-traceparent", "ce-x", "traceparent"]))
        return binary(stage, data, **{header: "x" * draw(st.integers(1, 16_000))})
    if kind == "many":
        count = draw(st.integers(50, 300))
        return binary(stage, data, **{f"ce-x{i}": "v" * 50 for i in range(count)})
    if kind == "type":
        return binary(stage, data, **{"content-type": draw(st.sampled_from(CONTENT_TYPES))})
    if kind in ("envelope", "base64"):
        event: dict[str, Any] = {
            "specversion": draw(st.sampled_from(["1.0", "0.3", "2.0", "", 1])),
            "type": draw(st.sampled_from([consumed(stage), "", None, 7])),
            "source": draw(st.just("/fuzz") | text(min_size=1, max_size=20)),
            "id": draw(st.sampled_from(["s-1", "", None, ["a"]]) | text(min_size=1, max_size=20)),
        }
        if kind == "base64":
            encoded = base64.b64encode(data).decode()
            event["data_base64"] = draw(st.sampled_from([encoded, "!!not base64", "", "AAAA"]))
        else:
            event["data"] = draw(JSON_VALUES)
        if draw(st.booleans()):
            event["time"] = draw(HEADER_TEXT)
        body = json.dumps({k: v for k, v in event.items() if v is not None}).encode()
        if draw(st.booleans()):  # cut short, or a byte that is not UTF-8
            body = body[: draw(st.integers(0, len(body)))] + draw(st.sampled_from([b"", b"\xff"]))
        return Request(body, {"content-type": STRUCTURED})
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"]))
    path = draw(
        st.sampled_from(["/x", "//", "/healthz/../", "/%00", "/openapi.json", "/" + "a" * 2000])
    )
    return Request(data, binary(stage, data).headers, method, path)
