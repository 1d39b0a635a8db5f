"""The data model: one schema for event data, HTTP bodies and the library API.

JSON Schema for each event payload is exported from these models into ``schemas/`` by
``python -m imagegen.schemas``; a test fails when the committed files drift.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from imagegen import stages
from imagegen.errors import ImageGenError
from imagegen.identity import (
    GENERATION_ID_PATTERN,
    MAX_AHEAD,
    aware,
    derive_generation_id,
    key_time,
    new_generation_id,
    not_ahead,
    parse_rfc3339,
)
from imagegen.validation import check_json_value

__all__ = [
    "GENERATION_ID_PATTERN",
    "MAX_CONTRIBUTIONS",
    "MAX_CONTRIBUTIONS_BYTES",
    "MAX_CONTRIBUTION_DATA_BYTES",
    "MAX_FINAL_PROMPT_CHARS",
    "MAX_LORAS",
    "MAX_LORA_HINTS",
    "MAX_LORA_PATH_CHARS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "MAX_PLUGINS",
    "MAX_PLUGIN_NAME_CHARS",
    "MAX_PNG_BYTES",
    "MAX_PROMPT_CHARS",
    "PROMPT_REFUSED_CHARACTERS",
    "Contribution",
    "DerivedImage",
    "EnhancedPrompt",
    "ErrorInfo",
    "GenerationFailed",
    "GenerationId",
    "GenerationRequest",
    "LoraHint",
    "PersistedImage",
    "RenderRequest",
    "RenderedImage",
    "Text",
    "derive_generation_id",
    "derive_seed",
    "json_size",
    "new_generation_id",
    "prompt_text",
]

MAX_PROMPT_CHARS = 2000
# A model's name, and what wrote a prompt ('ollama:<model>'): names, far below these.
MAX_MODEL_CHARS = 200
MAX_ENHANCER_CHARS = 256
# The final prompt: what enhance writes fits the largest text encoder's 512 tokens (about
# 2,600 characters by its estimate); a direct render's prompt is handed over as it is. No
# model reads further, so this only bounds what a caller may make render tokenize.
MAX_FINAL_PROMPT_CHARS = 4 * MAX_PROMPT_CHARS
MAX_METADATA_BYTES = 4096
MAX_METADATA_KEYS = 32
MAX_METADATA_DEPTH = 8
MAX_SEED = 2**32 - 1
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
# LoRAs one job applies. Render keeps as many adapters loaded per model (imagegen.render._lora),
# so a job never holds more than that at once, nor drops one of its own to load another.
MAX_LORAS = 8
# A LoRA's path: a local file or folder, or a hub id ("user/repo").
MAX_LORA_PATH_CHARS = 1024
# The LoRAs one plugin may offer: enhance keeps MAX_LORAS of them all, the first offered.
MAX_LORA_HINTS = 4 * MAX_LORAS
# The plugins one request runs, and so the contributions of one job: one each at most.
MAX_PLUGINS = 32
MAX_CONTRIBUTIONS = MAX_PLUGINS
MAX_PLUGIN_NAME_CHARS = 128
# What one plugin adds as data, measured as the metadata is: enough for the largest of the
# bundled plugins' (remote_context: 16 values of 200 characters, keys of 64, at most ~25 KB
# where every character is a control character's 6-byte escape).
MAX_CONTRIBUTION_DATA_BYTES = 32 * 1024
# Every contribution of a job together, measured so. A job travels whole in render's reply
# (RenderedImage.prompt), which persist and the ledger read within their 1 MiB body
# (functions/_binding.py, MAX_BODY_BYTES): the events are JSON escaped to ASCII, up to 3 times
# these bytes (4 bytes of UTF-8, "\ud83d\ude00"'s 12), so the largest valid job, every other
# field at its most too, stays well under it (tests/core/test_job_size.py). Plugins that add
# more than this together fail their job at enhance rather than its image at persist.
MAX_CONTRIBUTIONS_BYTES = 192 * 1024
# A stored object's size in bytes: a signed 64-bit integer, as storage and the ledger keep it.
MAX_OBJECT_BYTES = 2**63 - 1


def _utf8_text(value: object) -> object:
    # Checked before any other rule: pydantic's own length and pattern checks refuse a lone
    # surrogate without saying why, and a field without them let it through to fail where the
    # value is written (a digest, an event, a record: all UTF-8). A value of another type is
    # left to the field's own validation, which names its type. ASCII holds no surrogate: the
    # common case costs one C call (this runs for every text field of every event read).
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("holds a lone surrogate: not UTF-8 text") from None
    return value


_UTF8 = BeforeValidator(_utf8_text)
# Text a caller gives: any string UTF-8 can hold. JSON's "\ud800" escape makes one it cannot
# (a lone surrogate, RFC 8259, section 8.2), refused naming its field. Every str field of the
# models is checked so, dict keys and list items too: as ``Text``, or with ``_UTF8`` annotated
# last beside its own rules (pydantic runs the last before-validator first, and keeps in the
# JSON Schema a constraint annotated before a validator, not one after it).
Text = Annotated[str, _UTF8]
# Bounds inside the annotation, before the text check: an optional field's own max_length
# would be checked apart from its string schema, in pydantic's words for a list ("items").
ModelName = Annotated[str, StringConstraints(max_length=MAX_MODEL_CHARS), _UTF8]
GenerationId = Annotated[str, StringConstraints(pattern=GENERATION_ID_PATTERN), _UTF8]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$"), _UTF8]


def derive_seed(generation_id: str) -> int:
    """The seed used when a request gives none: a pure function of the generation id."""
    digest = hashlib.sha256(generation_id.encode()).digest()
    return int.from_bytes(digest[:4], "big")


@functools.cache
def _iana_zones() -> frozenset[str]:
    """The zones the tz database names, as this host has it: made on the first zone checked
    that is no ``UTC`` (listing them reads every file of the tz folders), then kept.

    A host's own names are none: ``localtime`` (its clock, whatever that is), ``Factory``
    (the database's placeholder), and ``posix/...`` and ``right/...`` (copies of the others,
    the latter counting leap seconds); ``ZoneInfo`` opens them all the same.
    """
    return frozenset(
        zone
        for zone in available_timezones()
        if zone not in {"localtime", "Factory", "posixrules"}
        and not zone.startswith(("posix/", "right/"))
    )


def _valid_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        if value != "UTC" and value not in _iana_zones():
            raise ZoneInfoNotFoundError(value)
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {value!r}") from None
    return value


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return key_time(value)


def _known_stage(value: str) -> str:
    if value not in stages.names():
        raise ValueError(f"unknown stage {value!r}; one of {', '.join(stages.names())}")
    return value


# The stages come from the registry: a new stage module is a valid value at once.
StageName = Annotated[
    str,
    AfterValidator(_known_stage),
    _UTF8,
    WithJsonSchema({"type": "string", "enum": list(stages.names())}),
]


def _multiple_of_16(value: int) -> int:
    if value % 16:
        raise ValueError(f"must be a multiple of 16, got {value}")
    return value


def _integral(value: object) -> object:
    # JSON has one number type, and JSON Schema's "integer" is any number with a zero fraction
    # (JSON Schema Core 2020-12, section 4.2.1): 512.0 is the integer 512 to every schema
    # published, so to the models too, where strict validation would refuse it as a float. Only
    # such a float is taken, then bounded as any integer is (1e300 is out of range, not an
    # error of its own); a bool, a string, a fraction, an infinity or NaN stays refused. A
    # float is one integer exactly, past 2**53 too: the one JSON's reader made of the text.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# Last, so it runs first and the bounds before it stay in the JSON Schema (as ``_UTF8``).
_INTEGRAL = BeforeValidator(_integral)
# Checked after the range (pydantic's own multiple_of comes first: 100 would be "a multiple of
# 16", not "at least 256"), and published in the JSON Schemas as multipleOf all the same.
Dimension = Annotated[
    int,
    Field(ge=256, le=2048, json_schema_extra={"multipleOf": 16}),
    AfterValidator(_multiple_of_16),
    _INTEGRAL,
]
# Each integer field's type, bounds inside the annotation (an optional field's own bounds would
# be checked apart from its integer schema, and published as no JSON Schema keyword).
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS), _INTEGRAL]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), _INTEGRAL]
ObjectSize = Annotated[int, Field(ge=0, le=MAX_OBJECT_BYTES), _INTEGRAL]
ThumbnailSize = Annotated[int, Field(ge=1), _INTEGRAL]

# The most bytes a stored PNG may take: what render's largest image (2048 x 2048, ``Dimension``)
# can be at the widest samples PNG has, 16-bit RGBA, 8 bytes a pixel (PNG spec 11.2.2, IHDR):
# 32 MiB; and 8 MiB of headroom for one filter byte a row (2 KiB, PNG spec 7.3), zlib's stored
# blocks where nothing compresses (5 bytes in 65,535: 3 KiB, RFC 1951 3.2.4), a chunk's 12
# bytes for each 8 KiB IDAT (libpng's: 48 KiB) and the chunks beside the pixels (an ICC
# profile, text): 40 MiB. Render's own PNGs, 8-bit RGB, are at most 12 MiB. A larger object
# is no image of render's, however few its pixels (a huge ancillary chunk): persist refuses it
# from its HEAD, derive from its record, so neither ever reads it into a pod.
MAX_PNG_BYTES = 2048 * 2048 * 8 + (8 << 20)


def json_size(value: Any) -> int:
    """``value``'s bytes as the metadata and a job's contributions are bounded: compact JSON
    in UTF-8, so "é" is 2 bytes, not the 6 of "\\u00e9"."""
    return len(_COMPACT.encode(value).encode())


# Made once: json.dumps with any argument builds an encoder per call, a third of the cost of
# measuring a contribution's few bytes (every job read measures each of them).
_COMPACT = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":"))


def _json_bytes(value: Any, most: int) -> None:
    size = json_size(value)
    if size > most:
        raise ValueError(f"at most {most} bytes as UTF-8 JSON, got {size}")


def _bounded_object(most: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def bounded(value: dict[str, Any]) -> dict[str, Any]:
        # Depth and NaN first: serializing a deeply nested value would exhaust the stack.
        check_json_value(value, max_depth=MAX_METADATA_DEPTH, text=True)
        if len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"at most {MAX_METADATA_KEYS} keys")
        _json_bytes(value, most)
        return value

    return bounded


# The keys published as maxProperties (their bytes and depth no JSON Schema keyword can say);
# checked by the validator, whose message names the limit as the others' do.
_FEW_KEYS = Field(json_schema_extra={"maxProperties": MAX_METADATA_KEYS})
Metadata = Annotated[dict[str, Any], _FEW_KEYS, AfterValidator(_bounded_object(MAX_METADATA_BYTES))]
# A plugin's structured context: its keys and strings UTF-8 text, bounded as the metadata is,
# in more bytes.
ContributionData = Annotated[
    dict[str, Any], _FEW_KEYS, AfterValidator(_bounded_object(MAX_CONTRIBUTION_DATA_BYTES))
]


def _json_text(value: Any) -> Any:
    check_json_value(value, text=True)
    return value


PluginOptions = Annotated[dict[str, dict[str, Any]], AfterValidator(_json_text)]


class _Model(BaseModel):
    # Validators and serializers built on first use, not at import: a function builds the
    # few its stage uses (``Stage.models``, after readiness when it has a warm-up), never the
    # rest, and ``import imagegen.models`` takes half the time.
    # Strict: a value of the wrong JSON type is a 400 naming its field, never converted ("1024"
    # a width, true a seed, "yes" a flag; 512.0 is JSON's integer 512 all the same, read so by
    # each integer field: ``_integral``), on every stage's input as on the request's. Event data
    # arrives as a mapping parsed from JSON, a plain body as JSON text: pydantic's strict rules
    # are the same for both here (an integer is still a number for a float field; a string a
    # Literal's value), but for times, a string in JSON that strict validation of a mapping
    # refuses: each time field reads it by its own rule first (``ChainTime``).
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, strict=True)


class LoraHint(_Model):
    """A LoRA the render stage applies: chosen by the ``lora`` plugin."""

    # The adapter's name in the pipeline: torch refuses a "." in a module's name.
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"), _UTF8]
    path: Text = Field(
        max_length=MAX_LORA_PATH_CHARS,
        description="Local file/directory or hub id of the LoRA weights.",
    )
    weight: float = Field(default=1.0, ge=0.0, le=2.0)
    trigger: Annotated[str, StringConstraints(max_length=200), _UTF8] | None = None


def _distinct_loras(value: list[LoraHint]) -> list[LoraHint]:
    # Each name is an adapter of its own. One path under two names loads the same weights twice
    # for nothing: their deltas add up, as one adapter at the sum of the weights would.
    for field in ("name", "path"):
        given = [getattr(lora, field) for lora in value]
        repeated = sorted({each for each in given if given.count(each) > 1})
        if repeated:
            raise ValueError(f"each LoRA once: {field} {', '.join(map(repr, repeated))} repeated")
    return value


# The LoRAs render applies to a job.
Loras = Annotated[list[LoraHint], Field(max_length=MAX_LORAS), AfterValidator(_distinct_loras)]


class Contribution(_Model):
    """What one prompt plugin adds to a generation."""

    plugin: Text = Field(max_length=MAX_PLUGIN_NAME_CHARS)
    text: Text = Field(default="", max_length=1000, description="A fragment for the prompt.")
    data: ContributionData = Field(
        default_factory=dict,
        description=(
            f"Structured context (≤ {MAX_CONTRIBUTION_DATA_BYTES} bytes as compact UTF-8 JSON,"
            f" ≤ {MAX_METADATA_KEYS} keys, nested ≤ {MAX_METADATA_DEPTH} deep)."
        ),
    )
    loras: list[LoraHint] = Field(
        default_factory=list,
        max_length=MAX_LORA_HINTS,
        description=f"LoRAs to apply (≤ {MAX_LORA_HINTS}); the job keeps {MAX_LORAS} in all.",
    )


def _bounded_contributions(value: list[Contribution]) -> list[Contribution]:
    _json_bytes([c.model_dump(mode="json") for c in value], MAX_CONTRIBUTIONS_BYTES)
    return value


# What a job's plugins added: one contribution each, all of them bounded together.
Contributions = Annotated[
    list[Contribution],
    Field(
        max_length=MAX_CONTRIBUTIONS,
        description=(
            f"One per plugin that added something (≤ {MAX_CONTRIBUTIONS}; together"
            f" ≤ {MAX_CONTRIBUTIONS_BYTES} bytes as compact UTF-8 JSON)."
        ),
    ),
    AfterValidator(_bounded_contributions),
]


def _time_text(value: object) -> object:
    # A string is read by the rule of the `time` attribute (imagegen.identity), not by
    # pydantic's, which takes a date, a time without an offset (as UTC) or a number of seconds
    # and refuses a leap second. Any other type is a caller's mistake, the same in JSON and in
    # a Python mapping (event data arrives as one); a datetime comes from the library's API.
    if isinstance(value, str):
        if value.strip().lstrip("+-").replace(".", "", 1).isdigit():
            raise ValueError("must be an RFC 3339 date-time, not a number of seconds")
        try:
            return parse_rfc3339(value)
        except ValueError:
            raise ValueError(
                "must be an RFC 3339 date-time with its offset (2026-01-02T03:04:05Z)"
            ) from None
    if value is not None and not isinstance(value, datetime):
        raise ValueError("must be an RFC 3339 date-time string")
    return value


# A time of the chain: an RFC 3339 string with its offset (or a datetime from the library's
# API), aware, in a year the storage keys can hold.
ChainTime = Annotated[datetime, BeforeValidator(_time_text), AfterValidator(_aware)]
# One that may be null: the rule around the union, so that an error names the field alone.
MaybeTime = Annotated[datetime | None, BeforeValidator(_time_text), AfterValidator(_aware)]


# What a prompt may not hold: C0 and C1 control characters (tab, line feed and carriage return
# aside: they are spaces) and the bidirectional embeddings, overrides and isolates, which
# reorder what is shown (a file name, a PNG's text) without changing what the model reads.
# Written as escapes that Python's re and JSON Schema's ECMA-262 patterns read alike, so that
# the schemas publish the same characters (``_PROMPT_PATTERN``); a lone surrogate, refused as
# any text's is (``_UTF8``), is no character a pattern can name.
_REFUSED_IN_PROMPTS = (
    r"\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069"
)
PROMPT_REFUSED_CHARACTERS = re.compile(f"[{_REFUSED_IN_PROMPTS}]")
# Published, not checked: prompt_text refuses first, naming the character and where it is.
_PROMPT_PATTERN = Field(json_schema_extra={"pattern": f"^[^{_REFUSED_IN_PROMPTS}]*$"})
_PROMPT_SPACES = str.maketrans("\t\n\r", "   ")


def prompt_text(value: str) -> str:
    """``value`` by the prompt rule: tab, line feed and carriage return become spaces.

    Applied before a prompt's edges are stripped, which would take a C1 control character
    (NEL, U+0085, is whitespace to Python) there without a word.

    Raises:
        ValueError: ``value`` holds another control character, or a bidirectional override
            or isolate (:data:`PROMPT_REFUSED_CHARACTERS`), naming the first.
    """
    if found := PROMPT_REFUSED_CHARACTERS.search(value):
        raise ValueError(
            f"holds the control character U+{ord(found.group()):04X} at {found.start()}"
        )
    return value.translate(_PROMPT_SPACES)


def _prompt_rule(value: object) -> object:
    # A value of another type is left to the field's own validation, which names its type.
    return prompt_text(value) if isinstance(value, str) else value


def _prompt_checked(value: object) -> object:
    # The prompt rule's refusals for a prompt already written (by enhance, or read back from a
    # record): refused as a request's prompt is, but never changed, so the job read is the job
    # written (its fingerprint, the record's digest).
    if isinstance(value, str):
        prompt_text(value)
    return value


# A prompt of the chain: what enhance wrote, or a direct caller gave.
WrittenPrompt = Annotated[str, _PROMPT_PATTERN, BeforeValidator(_prompt_checked), _UTF8]
# The prompt a request gave, as the chain carries it: bounded as ModelName is, said in characters.
OriginalPrompt = Annotated[
    str,
    StringConstraints(max_length=MAX_PROMPT_CHARS),
    _PROMPT_PATTERN,
    BeforeValidator(_prompt_checked),
    _UTF8,
]


class GenerationRequest(_Model):
    """Input of the enhance stage (event ``generation.requested``)."""

    generation_id: GenerationId | None = Field(
        default=None, description="Set by the caller or derived from the request event."
    )
    prompt: (
        Annotated[
            str,
            # The bound first, in the string's schema (said in characters), on the text as
            # given (as the JSON Schema's maxLength reads it); its edges stripped after.
            StringConstraints(max_length=MAX_PROMPT_CHARS),
            _PROMPT_PATTERN,
            BeforeValidator(_prompt_rule),
            StringConstraints(strip_whitespace=True),
            _UTF8,
        ]
        | None
    ) = Field(default=None, description="What to draw. Absent or empty: the enhancer dreams one.")
    width: Dimension = 1024
    height: Dimension = 1024
    steps: Steps | None = Field(default=None, description="Default: per model.")
    guidance: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Default: per model.",
    )
    seed: Seed | None = None
    model: ModelName | None = Field(default=None, description="One of the allowed models.")
    enhance: bool = Field(default=True, description="False: plugins only, no LLM.")
    plugins: list[Text] | None = Field(
        default=None,
        max_length=MAX_PLUGINS,
        description="Plugins to run, in order; default: the configured set.",
    )
    plugin_options: PluginOptions = Field(default_factory=dict)
    timezone: Annotated[Text | None, AfterValidator(_valid_timezone)] = Field(
        default=None, description="IANA zone for time-aware plugins; default: the configured zone."
    )
    requested_at: MaybeTime = Field(
        default=None, description="The request's time; fixes time-aware plugins."
    )
    metadata: Metadata = Field(
        default_factory=dict,
        description=(
            f"Caller data, kept with the image (≤ {MAX_METADATA_BYTES} bytes as compact UTF-8"
            f" JSON, ≤ {MAX_METADATA_KEYS} keys, nested ≤ {MAX_METADATA_DEPTH} deep)."
        ),
    )
    webhook: AnyHttpUrl | None = Field(
        default=None,
        description="URL the ledger notifies, signed the Standard Webhooks way.",
        # What AnyHttpUrl takes, said in the schema: the http and https schemes alone, in any
        # case (a URL's scheme is case-insensitive, RFC 3986 3.1).
        json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?:"},
    )
    webhook_events: list[Literal["started", "completed", "failed"]] = Field(
        default=["started", "completed", "failed"],
        max_length=3,
        description="Which webhook notifications to send.",
    )
    replay_of: GenerationId | None = Field(
        default=None, description="The generation this request replays, when it is a replay."
    )

    @field_validator("prompt")
    @classmethod
    def _empty_prompt_is_none(cls, value: str | None) -> str | None:
        return value or None


class EnhancedPrompt(_Model):
    """Output of enhance, input of render (event ``prompt.enhanced``).

    Every render parameter is fixed here, the seed included, so a retried render reproduces
    the same image.
    """

    generation_id: GenerationId
    prompt: WrittenPrompt = Field(
        max_length=MAX_FINAL_PROMPT_CHARS, description="The final prompt handed to the model."
    )
    original_prompt: OriginalPrompt | None = None
    dreamed: bool = Field(default=False, description="True when no prompt was given.")
    fallback: bool = Field(default=False, description="True when the LLM was unavailable.")
    enhancer: Text = Field(
        max_length=MAX_ENHANCER_CHARS,
        description="What wrote the prompt: 'ollama:<model>', 'template', 'passthrough'.",
    )
    contributions: Contributions = Field(default_factory=list)
    loras: Loras = Field(default_factory=list)
    model: Text = Field(max_length=MAX_MODEL_CHARS)
    width: Dimension
    height: Dimension
    steps: Steps
    guidance: float = Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: Seed
    requested_at: ChainTime
    enhanced_at: MaybeTime = Field(
        default=None,
        description="When enhance first wrote this prompt; kept with it, so every delivery "
        "says the same. Null for a job enhance did not write (a direct render request).",
    )
    metadata: Metadata = Field(default_factory=dict)
    replay_of: GenerationId | None = Field(
        default=None, description="The generation this one replays, when it is a replay."
    )
    # Not data: no event carries it (see dated_by_day).
    _dated_by_day: bool = PrivateAttr(default=False)

    @property
    def occurred_at(self) -> datetime:
        """The time of its event: the request's, fixed once for the generation."""
        return self.requested_at

    @property
    def dated_by_day(self) -> bool:
        """Whether ``requested_at`` is only the day of a direct call that named its generation
        but no time; render dates such a job by the day its generation was first rendered."""
        return self._dated_by_day

    def as_dated_by_day(self) -> EnhancedPrompt:
        """This job, marked :attr:`dated_by_day`."""
        job = self.model_copy()
        job._dated_by_day = True
        return job


class RenderRequest(_Model):
    """A direct render request over plain HTTP: a prompt, and any render parameter to fix.

    What a caller without enhance cannot know is filled in: a new generation id, the served
    model and its family's steps and guidance, the current time, the seed derived from the id,
    the enhancer "none". An enhanced prompt is a valid request as it is. Events keep the strict
    contract: a prompt.enhanced event carries every field.
    """

    generation_id: GenerationId | None = Field(default=None, description="Default: a new id.")
    prompt: Annotated[str, _PROMPT_PATTERN, BeforeValidator(_prompt_rule), _UTF8] = Field(
        min_length=1,
        max_length=MAX_FINAL_PROMPT_CHARS,
        description="What to draw, handed to the model as is.",
    )
    original_prompt: OriginalPrompt | None = None
    dreamed: bool = False
    fallback: bool = False
    enhancer: Text = Field(
        default="none",
        max_length=MAX_ENHANCER_CHARS,
        description="What wrote the prompt; 'none': the caller.",
    )
    contributions: Contributions = Field(default_factory=list)
    loras: Loras = Field(default_factory=list)
    model: ModelName | None = Field(default=None, description="Default: the model render serves.")
    width: Dimension = 1024
    height: Dimension = 1024
    steps: Steps | None = Field(default=None, description="Default: per model.")
    guidance: float | None = Field(
        default=None,
        ge=0.0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description="Default: per model.",
    )
    seed: Seed | None = Field(default=None, description="Default: derived from the generation id.")
    requested_at: MaybeTime = Field(default=None, description="Default: the current time.")
    enhanced_at: MaybeTime = Field(
        default=None, description="When enhance wrote the prompt, if it did."
    )
    metadata: Metadata = Field(default_factory=dict)
    replay_of: GenerationId | None = None

    @model_validator(mode="after")
    def _starts_now(self) -> Self:
        # A job enhance did not write starts its generation here, at the time its caller
        # names: not ahead of this clock, as at enhance (imagegen.identity.not_ahead). One
        # enhance wrote carries the time enhance took, whatever this clock says: enhance wrote
        # its enhanced_at after that time (the caller's clock up to MAX_AHEAD ahead of its
        # own), and before now. A body that says otherwise was not enhance's: its
        # enhanced_at would otherwise date any generation anywhere (2999, heading the history).
        field: str = "requested_at"
        value = self.requested_at
        try:
            if self.enhanced_at is not None:
                field, value = "enhanced_at", self.enhanced_at
                not_ahead(self.enhanced_at)
            if self.requested_at is None:
                return self
            if self.enhanced_at is None:
                field, value = "requested_at", self.requested_at
                not_ahead(self.requested_at)
            elif aware(self.requested_at) - aware(self.enhanced_at) > MAX_AHEAD:
                field, value = "requested_at", self.requested_at
                raise ValueError("must not be after enhanced_at: enhance writes it later")
        except ValueError as exc:
            error = PydanticCustomError("time_ahead", str(exc))
            detail = InitErrorDetails(type=error, loc=(field,), input=value)
            raise ValidationError.from_exception_data(type(self).__name__, [detail]) from None
        return self


class RenderedImage(_Model):
    """Output of render, input of persist (event ``image.rendered``): a claim check."""

    generation_id: GenerationId
    key: Text = Field(description="Object key relative to the storage root.")
    location: Text = Field(description="URI of the stored PNG (s3://… or file://…).")
    content_type: Literal["image/png"] = "image/png"
    size: ObjectSize
    sha256: Sha256
    width: Dimension
    height: Dimension
    seed: Seed
    model: Text
    steps: Steps
    guidance: float = Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    timings: dict[Text, float] = Field(default_factory=dict, description="Seconds per phase.")
    rendered_at: MaybeTime = Field(
        default=None,
        description="When the image was stored; its first writer fixes it for every reply.",
    )
    prompt: EnhancedPrompt

    @property
    def occurred_at(self) -> datetime:
        """The time of its event: when the image's first writer stored it."""
        return self.rendered_at or self.prompt.requested_at


class PersistedImage(_Model):
    """Output of persist (event ``image.persisted``): where the image now lives."""

    generation_id: GenerationId
    key: Text
    location: Text
    url: Text | None = Field(default=None, description="Public URL of the full image.")
    keys: dict[Text, Text] = Field(description="Object keys: image, thumbnail, metadata.")
    urls: dict[Text, Text] = Field(
        default_factory=dict,
        description="Public URLs, signed when IMAGEGEN_URL_SIGNING_SECRET is set: `image` (the "
        "full image, as url) and `thumbnail`; empty without IMAGEGEN_PUBLIC_BASE_URL. The "
        "AVIF/WebP derivatives that derive makes later have none of their own: the full image's "
        "URL serves them, chosen by Accept and ?w=.",
    )
    metadata_location: Text
    content_type: Literal["image/png"] = "image/png"
    size: ObjectSize
    sha256: Sha256
    width: Dimension
    height: Dimension
    seed: Seed
    model: Text
    prompt: WrittenPrompt
    timings: dict[Text, float] = Field(default_factory=dict)
    created_at: ChainTime = Field(
        description="When the image was rendered (else requested): taken from the event chain."
    )
    persisted_at: MaybeTime = Field(
        default=None,
        description="When persist's first writer wrote the record; null in a record written "
        "before it was kept.",
    )
    replay_of: GenerationId | None = Field(
        default=None, description="The generation this one replays, when it is a replay."
    )

    @property
    def occurred_at(self) -> datetime:
        """The time of its event: the record's ``created_at``."""
        return self.created_at


class DerivedImage(_Model):
    """Output of derive (event ``image.derived``): the AVIF/WebP derivatives of a final image.

    The same content is kept as the derivatives record (``keys["record"]``), which the Worker
    reads to choose a derivative by ``Accept`` and ``w``; until it exists the PNG is served.
    """

    generation_id: GenerationId
    key: Text = Field(description="The full image (PNG) the derivatives were made from.")
    sha256: Sha256 = Field(description="The full image's digest.")
    keys: dict[Text, Text] = Field(
        description="Object keys: record (this record), thumbnail (the WebP thumbnail), "
        "and avif:<width>, webp:<width> (each derivative)."
    )
    # Kept so that a lost thumbnail is remade to the same bytes whatever the setting is now.
    thumbnail_size: ThumbnailSize | None = Field(
        default=None,
        description="The longer side, in pixels, that the thumbnail was made no larger than: "
        "its first writer's IMAGEGEN_THUMBNAIL_SIZE; null in a record written before it was "
        "kept (a lost thumbnail is then remade at the current setting).",
    )
    created_at: ChainTime = Field(description="The image's created_at, from image.persisted.")
    persisted_at: MaybeTime = Field(
        default=None, description="The image's persisted_at, from image.persisted."
    )
    replay_of: GenerationId | None = Field(
        default=None, description="The generation this one replays, when it is a replay."
    )

    @property
    def occurred_at(self) -> datetime:
        """The time of its event: the image's ``created_at``, like ``image.persisted``."""
        return self.created_at


class ErrorInfo(_Model):
    code: Text
    message: Text
    retryable: bool
    errors: list[dict[Text, Text]] = Field(default_factory=list)

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """What a ``generation.failed`` says of ``exc``: its code and fields, never a trace."""
        if isinstance(exc, ImageGenError):
            errors = [{_escaped(k): _escaped(v) for k, v in e.items()} for e in exc.errors]
            return cls(
                code=exc.code, message=_escaped(exc.message), retryable=exc.retryable, errors=errors
            )
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):  # Ctrl-C, a shutdown
            return cls(code="cancelled", message="stopped before it finished", retryable=True)
        return cls(code="internal", message=_escaped(str(exc)[:1000]), retryable=False)


def _escaped(text: str) -> str:
    # What an error says may quote what the caller sent: a lone surrogate in it is written as
    # its escape ("\ud800"), so that the failure itself is UTF-8 text, as its event must be.
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode()


class GenerationFailed(_Model):
    """Event ``generation.failed``: a failure that will not be retried."""

    generation_id: GenerationId | None = None
    stage: StageName
    error: ErrorInfo
    failed_at: MaybeTime = Field(
        default=None,
        description="The failing event's time; null when it had none (a clock's time would "
        "differ between deliveries of one event, which must fail alike).",
    )

    @property
    def occurred_at(self) -> datetime | None:
        """The time of its event: ``failed_at`` (None: the event it reports had none)."""
        return self.failed_at
