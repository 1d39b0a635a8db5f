"""The event contract: types, sources, schemas and ids of the events the stages exchange.

Transport-free: the HTTP/CloudEvents binding lives in ``functions/``.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

if TYPE_CHECKING:
    from pydantic import BaseModel

__all__ = [
    "ATTRIBUTE_MAX_LENGTHS",
    "DREAM_PING",
    "GENERATION_FAILED",
    "GENERATION_REQUESTED",
    "HEADER_SAFE",
    "ID_MAX_LENGTH",
    "IMAGE_DERIVED",
    "IMAGE_PERSISTED",
    "IMAGE_RENDERED",
    "MODEL_ATTRIBUTE",
    "PROMPT_ENHANCED",
    "SCHEMA_BASE_URL",
    "SOURCE_MAX_LENGTH",
    "TEXT_ATTRIBUTES",
    "TYPE_MAX_LENGTH",
    "dataschema",
    "event_models",
    "event_type",
    "failure_cause",
    "header_value",
    "is_final",
    "name_uuid",
    "reply_attributes",
    "reply_id",
    "routing_attributes",
    "short_name",
    "source_for",
    "text_problem",
]

_PREFIX: Final = "dev.orchestr8.imagegen."
GENERATION_REQUESTED: Final = _PREFIX + "generation.requested"  # see event_type()
PROMPT_ENHANCED: Final = _PREFIX + "prompt.enhanced"
IMAGE_RENDERED: Final = _PREFIX + "image.rendered"
IMAGE_PERSISTED: Final = _PREFIX + "image.persisted"
IMAGE_DERIVED: Final = _PREFIX + "image.derived"
GENERATION_FAILED: Final = _PREFIX + "generation.failed"
# A Knative PingSource can only send this type; enhance treats it as a prompt-less request.
DREAM_PING: Final = "dev.knative.sources.ping"

# A CloudEvents extension attribute: render Triggers filter on it where several render
# services serve different models (knative/overlays/prod).
MODEL_ATTRIBUTE: Final = "imagegenmodel"

SCHEMA_BASE_URL: Final = "https://schemas.orchestr8.dev/imagegen/"

# How long an event's attributes may be: the ledger's bounds, which every stage enforces too.
# The ledger keeps each event under its ``source`` and ``id`` and refuses one past these
# (imagegen.ledger.LedgerEvent); a stage that took such an event would run the generation while
# the ledger, refusing it, never learned of it (nor of the webhook it names). So each stage's
# binding (functions/_binding.py) refuses what the ledger would. Lengths are characters
# (Unicode code points), as pydantic counts them.
SOURCE_MAX_LENGTH: Final = 1024
ID_MAX_LENGTH: Final = 1024
TYPE_MAX_LENGTH: Final = 256
# Each bounded attribute's most characters; the others (``subject`` among them) are unbounded.
ATTRIBUTE_MAX_LENGTHS: Final = MappingProxyType(
    {"source": SOURCE_MAX_LENGTH, "id": ID_MAX_LENGTH, "type": TYPE_MAX_LENGTH}
)

# The String attributes a stage reads or the ledger keeps, each refused by every stage where it
# holds what a CloudEvents String must not (the others are read as their own types, or not at
# all). The ledger keeps an event under its ``source`` and ``id``, and its databases hold neither
# a NUL nor a lone surrogate (imagegen/ledger/_text.py): a stage that took one would run an
# event the ledger refused, or kept as another (``c-\u0000`` stored as ``c-\ufffd``, then an
# event ``c-\ufffd`` dropped as its redelivery). Not ``traceparent`` nor ``tracestate``: W3C
# Trace Context (w3c/trace-context, sections 3.2.2 and 3.3) has a receiver ignore trace
# context it cannot parse, never fail the request for it, and the binding does
# (functions/_binding.py, ``_w3c_only``); no stage passes them on as they came, nor does the
# ledger keep them.
TEXT_ATTRIBUTES: Final = ("id", "source", "type", "subject")
# What a String must not hold (CloudEvents 1.0.2, cloudevents/spec.md, "Type System": String):
# the control characters U+0000-U+001F and U+007F-U+009F, surrogates not in a pair (JSON's
# escaped pairs are read as the characters they encode, so any surrogate in a ``str`` is one)
# and Unicode's noncharacters, U+FDD0-U+FDEF and the last two code points of each plane.
_NOT_STRING = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)


def text_problem(value: str) -> str | None:
    """Why ``value`` is no CloudEvents String, naming its first character that may not be
    there (:data:`TEXT_ATTRIBUTES`' rule); None where it is one."""
    found = _NOT_STRING.search(value)
    if found is None:
        return None
    code = ord(found.group())
    kind = (
        "control character"
        if code <= 0x9F
        else "surrogate"
        if 0xD800 <= code <= 0xDFFF
        else "noncharacter"
    )
    return f"holds the {kind} U+{code:04X} at {found.start()}, which a CloudEvents String must not"


def event_models() -> dict[str, type[BaseModel]]:
    """Each imagegen event type and its data model, from the stage registry."""
    from imagegen import stages
    from imagegen.models import GenerationFailed

    models: dict[str, type[BaseModel]] = {}
    for stage in stages.all_stages():
        for event_type in stage.consumes:
            if event_type.startswith(_PREFIX) and stage.input_model is not None:
                models[event_type] = stage.input_model
        if stage.emits is not None and stage.output_model is not None:
            models[stage.emits] = stage.output_model
    models[GENERATION_FAILED] = GenerationFailed
    return models


def event_type(short: str) -> str:
    """``image.rendered`` → ``dev.orchestr8.imagegen.image.rendered``: a type of ours."""
    return _PREFIX + short


def short_name(event_type: str) -> str:
    """``dev.orchestr8.imagegen.image.rendered`` → ``image.rendered``."""
    return event_type.removeprefix(_PREFIX)


def dataschema(event_type: str) -> str:
    """The published JSON Schema URL of ``event_type``'s data."""
    return f"{SCHEMA_BASE_URL}{short_name(event_type)}.json"


def source_for(stage: str) -> str:
    """The CloudEvents ``source`` of events emitted by ``stage``."""
    return f"/imagegen/{stage}"


def reply_id(generation_id: str, event_type: str) -> str:
    """A stable event id: a redelivered request gets a reply with the same id.

    ``uuid.uuid5`` of ``imagegen:<generation_id>:<event_type>`` (:func:`name_uuid`):
    ``generation_id`` may name the failing event by its ``source`` and ``id``, which an
    event's JSON may escape a lone surrogate into (``"\\ud800"``).
    """
    return name_uuid(f"imagegen:{generation_id}:{event_type}")


def name_uuid(name: str) -> str:
    """``uuid.uuid5(uuid.NAMESPACE_URL, name).hex``, computed as it computes it (RFC 4122,
    section 4.3: SHA-1 of the namespace and the name's UTF-8), but with lone surrogates
    encoded as they came: the same id for every other name, and no error for those."""
    encoded = name.encode("utf-8", "surrogatepass")
    digest = hashlib.sha1(uuid.NAMESPACE_URL.bytes + encoded, usedforsecurity=False).digest()
    return uuid.UUID(bytes=digest[:16], version=5).hex


def failure_cause(source: str, event_id: str) -> str:
    """The name of an event, by its ``source`` and ``id``: the cause a ``generation.failed``
    answering it names, and what :func:`imagegen.identity.derive_generation_id` derives the
    generation id of a request that names none from. One name per pair.

    ``<source>#<id>``, unless ``source`` holds a ``#``: CloudEvents' ``source`` is a
    URI-reference, which may hold one (a fragment), and its ``id`` any string, so
    ``("/a#b", "c")`` and ``("/a", "b#c")`` would join alike. A source with a ``#`` is named
    otherwise: both parts with ``%``, ``#`` and ``|`` percent-escaped, joined by ``|``. That name
    holds no ``#``, so it is never the name of a source without one, and the escape makes it
    one pair's; a source without a ``#``, the usual one, keeps the name it always had.
    """
    if "#" in source:
        return f"{_escaped(source)}|{_escaped(event_id)}"
    return f"{source}#{event_id}"


def _escaped(part: str) -> str:
    return part.replace("%", "%25").replace("#", "%23").replace("|", "%7C")


def _reply_name(generation_id: str | None, cause: str | None) -> str:
    """What a reply's id is derived from: one name per generation and cause.

    ``<generation_id>:<cause>`` (a generation id holds no ``:``), the generation id alone, or
    the cause alone (``unknown`` for neither). A cause alone with a ``:`` before its first
    ``#`` (``urn:x#c``) would read as a generation id and a cause (``urn`` and ``x#c``): it
    is named with a leading ``:``, which no generation id begins with. Every other name is the
    one it always was, so a redelivery after an upgrade keeps its reply's id.
    """
    if generation_id and cause:
        return f"{generation_id}:{cause}"
    if cause:
        return f":{cause}" if ":" in cause.partition("#")[0] else cause
    return generation_id or "unknown"


def reply_attributes(
    stage: str,
    event_type: str,
    data: BaseModel,
    generation_id: str | None,
    extensions: Mapping[str, str],
    *,
    cause: str | None = None,
) -> dict[str, str]:
    """The attributes of the event ``stage`` answers with: alike for every delivery.

    The id is stable for the generation and, for a failure, ``cause``, the event that failed
    (:func:`failure_cause`): a generation's stage answers one event (first writer wins), but
    may fail on two different requests naming it, two events the sinks and the ledger, keyed
    on ``source`` and ``id`` as CloudEvents has them unique, must both keep. The time comes
    from the data, never the clock (none where the data has none: a failure of an event
    without a time), so a redelivery to any replica answers alike.
    """
    named = _reply_name(generation_id, cause)
    attributes = {
        "type": event_type,
        "source": source_for(stage),
        "id": reply_id(named, event_type),
        "datacontenttype": "application/json",
        "dataschema": dataschema(event_type),
    }
    occurred = getattr(data, "occurred_at", None)
    if occurred is not None:
        attributes["time"] = occurred.isoformat()
    if generation_id:
        attributes["subject"] = generation_id
    return attributes | {k: v for k, v in extensions.items() if v} | routing_attributes(data)


# Knative's dispatchers retry these statuses and every 5xx; any other 4xx is final
# (eventing pkg/kncloudevents/retries.go, the default retry criteria).
RETRIED_BY_KNATIVE = frozenset({404, 408, 409, 429})


def is_final(status: int) -> bool:
    """Whether Knative gives up on a delivery answered with ``status`` (no retry)."""
    return 400 <= status < 500 and status not in RETRIED_BY_KNATIVE


def routing_attributes(data: BaseModel) -> dict[str, str]:
    """The extension attributes Triggers route ``data``'s event on: a render job's model."""
    from imagegen.models import EnhancedPrompt

    if isinstance(data, EnhancedPrompt):
        return {MODEL_ATTRIBUTE: data.model}
    return {}


# What a ce-* header value may hold unencoded: printable ASCII but for '"' and '%'.
HEADER_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


def header_value(value: str) -> str:
    """``value`` as a binary-mode ``ce-*`` header carries it (HTTP binding, section 3.1.3.2):
    a space, ``"``, ``%`` and every character outside printable ASCII percent-encoded (UTF-8),
    so that the receiver's decoding gives ``value`` back (``%41`` stays ``%41``, not ``A``)."""
    return quote(value, safe=HEADER_SAFE)
