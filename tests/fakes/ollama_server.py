"""A fake Ollama on loopback: a real HTTP server speaking the API the ``ollama`` client uses.

Endpoints: ``POST /api/chat`` (``stream: false`` → one JSON object, ``stream: true`` → NDJSON
chunks; without messages, a load of the model), ``GET /api/tags``, ``GET /api/version`` and
``GET /`` (``Ollama is running``), the last three for ``HEAD`` too. Any other request is answered
as Ollama's router, gin, answers it (:data:`_ROUTES`). Every request is recorded. Chat answers
are scripted::

    with FakeOllama() as fake:
        fake.answer(reply({"prompt": "a red fox"}))   # every chat, until changed
        fake.reply_with('{"prompt": "a red fox"}')     # the same, shorter
        fake.enqueue(http_error(500), not_json())     # the next two chats, then the default
        fake.answer(slow(2.0))                        # answers after 2 s (or when stopped)
        fake.stop()                                   # "down": connections refused
        fake.start()                                  # back, on the same port
        fake.chat_requests[0]["options"]["seed"]
        fake.loading = slow(5.0)                      # loading a model takes 5 s
        fake.load_requests                            # the chats without messages
        fake.model_loads                              # [("llama3.2:latest", "load"), ...]
        fake.thinking_models.add("qwen3:latest")      # a model that can think
        fake.always_thinking.add("gpt-oss:latest")    # one that thinks with think: false too
        fake.answer(reply(thinking="Okay, the user wants a fox..."))  # what it thinks, if on
        fake.version, fake.parsers["qwen3:latest"] = "0.12.4", "qwen3-thinking"
        fake.answer(format_ignored('```json\n{"prompt": "a fox"}\n```'))  # where unconstrained

Thinking and ``num_predict`` are modelled as Ollama has them:

- ``think`` is a bool or one of ``"high"``, ``"medium"``, ``"low"`` and, from v0.21.3-rc0
  (commit c2ebb4d57, "api: accept "max" as a think value"; first released in v0.22.0),
  ``"max"``; anything else is a 400 (api/types.go, ``ThinkValue.UnmarshalJSON``). No level is
  checked against the model: a level is thinking on, whichever model (gpt-oss's harmony parser
  reads ``"max"`` as ``"high"``). As Ollama reads ``think`` while it binds the body
  (server/routes.go, ``ChatHandler``: ``c.ShouldBindJSON(&req)``, before ``getModel``), a bad
  one is that 400 even for a model it does not have, and for a chat without messages.
- Unset, ``think`` is on for a model that can think; true (or a level) for a model that cannot
  is a 400 ``"<model>" does not support thinking`` (server/routes.go, ``ChatHandler``: ``if
  req.Think == nil { req.Think = &api.ThinkValue{Value: true} }``), given after the model is
  looked up (an unknown one is the 404) and after an unload (no messages, ``keep_alive`` 0), but
  before ``scheduleRunner``: nothing is loaded, for a chat or a load, and nothing is generated.
  These rules are read at ollama/ollama fb3076099 (v0.33.0-rc2), and kept at every
  :attr:`FakeOllama.version` but ``"max"``'s. (A server older than ``think``, v0.9.0, would
  ignore the field: Go's ``encoding/json``, under gin's ``ShouldBindJSON``, skips unknown
  fields; that is not modelled.)
- The thinking, when on, is generated first and answered apart as ``message.thinking``; the
  reply follows in ``content``. Both count against ``options.num_predict`` (runner/
  ollamarunner/runner.go: a sequence ends once ``numPredicted >= numPredict``, with
  ``DoneReasonLength``), so thinking that uses it up leaves ``content`` empty and
  ``done_reason`` ``"length"``. Tokens are counted here as words separated by spaces.

``format`` (structured outputs) is applied as server/routes.go, ``ChatHandler``, applies it.
Scripted answers say what the model writes under it (``content``) and, where it differs, without
it (``unconstrained``, e.g. :func:`format_ignored`'s fenced or preambled JSON):

- Before v0.12.4 it constrains every reply from the first token.
- From v0.12.4 (commit 77060d462, "routes: structured outputs for gpt-oss") a model that can
  think and has a built-in parser (:attr:`FakeOllama.parsers`, Modelfile ``PARSER``) or thinks
  (the generic thinking parser) is sampled first with ``currentFormat = nil``; the format is
  applied, in a second request, only once thinking text was followed by content. With no
  thinking (``think: false``, or a model that thought nothing) the reply is never constrained.
- ``forceImmediate`` then applies it from the start with ``think: false``: from v0.21.1
  (5d1021603) for the ``gemma4`` parser only, from v0.31.2 (892e7f6be) for every parser whose
  ``HasThinkingSupport()`` is true (model/parsers/parsers.go, ``ParserForName``).

A request is bound and its model's name checked before the model is looked up (server/routes.go,
``ChatHandler``; read at v0.6.0, v0.12.6 and fb3076099): an empty body is a 400 ``missing
request body`` (``ShouldBindJSON`` returns ``io.EOF``), one that starts with no JSON object a 400
with the decoder's error (what follows the first value is never read), and a name that
``model.ParseName`` makes no valid name of (types/model/name.go, :func:`_valid_name`) a 400
``model is required``; from v0.18.0 (799e51d41, "don't require pulling stubs for cloud models",
``parseAndValidateModelRef``) only an empty one says that, one with two source suffixes
(``x:local:cloud``) is refused with ``use either :local or :cloud, not both``, and any other
``invalid model name``. (On some versions an unload, a chat without messages and with a
zero ``keep_alive``, looked its model up first: not modelled.)

``authorization`` puts a proxy in front, one that wants that ``Authorization`` header on every
request (nginx's ``auth_basic``, say) and answers any other with a 401 and a
``WWW-Authenticate`` challenge (RFC 9110, 11.6.1), before Ollama sees it.

``keep_alive`` is read as api/types.go reads it, at :attr:`FakeOllama.version`: a number of
seconds cut to whole seconds before v0.11.8 (so ``0.5`` is 0), a Go duration string as written.
A zero one unloads the model after a chat; a chat without messages unloads it where
``ChatHandler`` expires the runner (:func:`_expires_on_load`: before v0.12.4, on most versions,
for any ``keep_alive`` under a second).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any, Self
from urllib.parse import urlsplit

from tests.fakes.loopback import LoopbackServer, Running

__all__ = [
    "Behaviour",
    "FakeOllama",
    "RecordedRequest",
    "broken_body",
    "format_ignored",
    "http_error",
    "missing_fields",
    "not_json",
    "reply",
    "slow",
]

DEFAULT_PROMPT = "a red fox in a snowy birch forest, soft morning light, watercolor"


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one chat request.

    Attributes:
        content: The assistant message's content (a dict is sent as its JSON text).
        status: The HTTP status; not 200 → ``{"error": content}``.
        body: A raw body to send instead of a chat response, or of the error object (for
            broken responses), with ``status``.
        delay: Seconds to wait before answering (cut short when the server stops).
        trickle: Seconds between the body's pieces of 16 bytes (0: all at once).
        thinking: What the model thinks before it answers, where thinking is on.
        unconstrained: What the model writes where Ollama does not apply ``format`` (see the
            module docstring); None: ``content``, as under the format.
    """

    content: str | dict[str, Any] = field(default_factory=lambda: {"prompt": DEFAULT_PROMPT})
    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    trickle: float = 0.0
    thinking: str = ""
    unconstrained: str | None = None


def reply(
    content: str | dict[str, Any] | None = None, *, delay: float = 0.0, thinking: str = ""
) -> Behaviour:
    """A normal answer; ``content`` defaults to ``{"prompt": DEFAULT_PROMPT}``."""
    return Behaviour(
        content={"prompt": DEFAULT_PROMPT} if content is None else content,
        delay=delay,
        thinking=thinking,
    )


def not_json(text: str = "Sure! A fox, in the snow, I think?") -> Behaviour:
    """An answer whose content is not JSON (a model ignoring ``format``)."""
    return Behaviour(content=text)


def format_ignored(
    text: str, content: str | dict[str, Any] | None = None, *, thinking: str = ""
) -> Behaviour:
    """A model that writes ``text`` (fenced JSON, a preamble before it) where Ollama does not
    apply ``format``, and ``content`` (default ``{"prompt": DEFAULT_PROMPT}``) where it does."""
    return Behaviour(
        content={"prompt": DEFAULT_PROMPT} if content is None else content,
        thinking=thinking,
        unconstrained=text,
    )


def missing_fields() -> Behaviour:
    """An answer whose content is JSON without the ``prompt`` field."""
    return Behaviour(content={"description": "a fox"})


def broken_body() -> Behaviour:
    """A 200 whose body is JSON but no chat response (no ``message``)."""
    return Behaviour(body=b'{"model": "llama3.2", "done": true}')


def slow(delay: float, content: str | dict[str, Any] | None = None) -> Behaviour:
    """A normal answer sent only after ``delay`` seconds."""
    return reply(content, delay=delay)


def http_error(status: int = 500, message: str = "model runner crashed") -> Behaviour:
    """An HTTP error with Ollama's ``{"error": ...}`` body."""
    return Behaviour(content=message, status=status)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the fake; ``json`` is the parsed body, if any."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any


def _asks_for_reply(body: Any) -> bool:
    """Whether a chat request has messages (server/routes.go: ``len(req.Messages) == 0``)."""
    return not isinstance(body, dict) or bool(body.get("messages"))


# types/model/name.go, isValidPart: a letter, digit or "_" first, then those, "-", "." (not in a
# namespace) and ":" (in a host only); isValidLen: 1 to 80 characters, a host up to 350.
_HOST = r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"
_NAMESPACE = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"
_MODEL = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
# ParseNameBare: the tag after a ":" past the last "/", then the model, the namespace and the
# host (what comes before a "://" in it dropped) at the last "/" each; ParseName fills the parts
# left out, which are then valid, so only those given are checked.
_VALID_NAME = re.compile(
    rf"(?:(?:(?:(?!://).)*://)?{_HOST}/{_NAMESPACE}/|{_NAMESPACE}/)?{_MODEL}(?::{_MODEL})?",
    re.DOTALL,
)
# From v0.18.0 a ":cloud" or ":local" suffix, or a tag ending in "-cloud", says where the model
# runs, and is not part of its name (internal/modelref/modelref.go, parseSourceSuffix); the name
# is trimmed, and one with a second such suffix under the first refused (ParseRef).
_SOURCE_SUFFIX_FROM = (0, 18, 0)


def _source_suffix(model: str) -> tuple[str, bool]:
    """``model`` without its source suffix, and whether it had one (``parseSourceSuffix``): a
    last ``:`` part that is ``cloud`` or ``local`` is dropped; one ending in ``-cloud`` (and with
    no ``/``) loses that ending."""
    base, colon, suffix = model.rpartition(":")
    if not colon:
        return model, False
    suffix = suffix.strip()
    if suffix.lower() in ("cloud", "local"):
        return base, True
    if "/" not in suffix and suffix.lower().endswith("-cloud"):
        return f"{base}:{suffix[: -len('-cloud')]}", True
    return model, False


def _conflicting_source(model: str, version: str) -> bool:
    """Whether Ollama at ``version`` refuses ``model`` for naming two sources (``ParseRef``:
    ``ErrConflictingSourceSuffix``), as ``llama3.2:local:cloud`` or ``x:cloud-cloud`` do."""
    if _version(version) < _SOURCE_SUFFIX_FROM:
        return False
    base, explicit = _source_suffix(model.strip())
    return explicit and _source_suffix(base)[1]


def _base_name(model: str, version: str) -> str:
    """The name Ollama at ``version`` parses and looks up for a request's ``model``. (A
    ``:cloud`` one is sent on to ollama.com there: not modelled, it is looked up here.)"""
    if _version(version) >= _SOURCE_SUFFIX_FROM:
        model, _ = _source_suffix(model.strip())
    return model


def _valid_name(model: str, version: str) -> bool:
    """Whether Ollama at ``version`` makes a valid name of ``model`` (``name.IsValid()``), and
    it names one source at most."""
    if _conflicting_source(model, version):
        return False
    return _VALID_NAME.fullmatch(_base_name(model, version)) is not None


def _name_error(model: Any, version: str) -> str | None:
    """Ollama's 400 for a chat naming ``model`` where it is no valid name, or None."""
    if isinstance(model, str) and _conflicting_source(model, version):
        # writeModelRefParseError (server/routes.go): the error itself, with the name trimmed.
        quoted = json.dumps(model.strip(), ensure_ascii=False)  # Go's %q, for the most part
        return f"use either :local or :cloud, not both: {quoted}"
    if isinstance(model, str) and _valid_name(model, version):
        return None
    if _version(version) < _SOURCE_SUFFIX_FROM or not str(model or "").strip():
        return "model is required"
    return "invalid model name"


# JSON's white space (RFC 8259), all Go's decoder skips before a value.
_JSON_SPACE = " \t\n\r"


def _first_value(raw: bytes) -> Any:
    """The first JSON value in ``raw``, as ``ShouldBindJSON`` decodes it: gin's binding/json.go,
    ``decodeJSON``, calls ``json.NewDecoder(r).Decode`` once, which reads one value and leaves
    what follows it unread, and takes invalid UTF-8 in a string as U+FFFD.

    Raises:
        json.JSONDecodeError: No JSON value starts ``raw``.
    """
    text = raw.decode("utf-8", errors="replace").lstrip(_JSON_SPACE)
    return json.JSONDecoder().raw_decode(text)[0]


def _bind_error(raw: bytes) -> str | None:
    """Why ``ShouldBindJSON`` refuses ``raw`` as an ``api.ChatRequest``, or None: Go's wording
    for a body that starts with no JSON value, or not an object; Python's decoder's for the
    rest. What follows the first value is never read (:func:`_first_value`)."""
    try:
        value = _first_value(raw)
    except json.JSONDecodeError as exc:
        first = raw.lstrip(_JSON_SPACE.encode())[:1].decode("latin-1")
        if exc.pos == len(exc.doc.rstrip(_JSON_SPACE)):
            return "unexpected EOF"
        if first not in '{["-0123456789tfn':
            return f"invalid character '{first}' looking for beginning of value"
        return str(exc)
    kinds = {list: "array", str: "string", bool: "bool", int: "number", float: "number"}
    if value is not None and not isinstance(value, dict):
        return f"json: cannot unmarshal {kinds[type(value)]} into Go value of type api.ChatRequest"
    if isinstance(value, dict) and "model" in value:
        model = value["model"]
        if model is not None and not isinstance(model, str):
            kind = "object" if isinstance(model, dict) else kinds[type(model)]
            return (
                f"json: cannot unmarshal {kind} into Go struct field ChatRequest.model"
                " of type string"
            )
    return None


def _canonical(model: str) -> str:
    """A model's name as Ollama resolves it, lower-case: ``llama3.2``, ``library/llama3.2``
    and ``registry.ollama.ai/library/Llama3.2:latest`` are all ``llama3.2:latest``.

    types/model/name.go: ``ParseName`` reads ``[host/][namespace/]model[:tag][+build][@digest]``
    (an ``http://`` or ``https://`` before it dropped) and fills what is missing from
    ``FillDefault``, ``registry.ollama.ai/library/?:latest``; ``Name.EqualFold`` compares
    names ASCII case-insensitively. The default host and namespace are left off again here, as
    ``/api/tags`` lists such a model (``DisplayShortest``). Build and digest are not compared.
    """
    if model.startswith("http://"):
        model = model.removeprefix("http://")
    else:
        model = model.removeprefix("https://")
    head, _, last = model.partition("@")[0].rpartition("/")
    name, _, tag = last.partition("+")[0].partition(":")
    host, _, namespace = head.rpartition("/")
    if namespace in ("", "library") and host in ("", "registry.ollama.ai"):
        head = ""
    else:
        head = f"{host or 'registry.ollama.ai'}/{namespace or 'library'}/"
    return f"{head}{name}:{tag or 'latest'}".lower()


# api/types.go, Duration.UnmarshalJSON: a JSON number is seconds, cut to whole seconds
# (``time.Duration(int(t) * int(time.Second))``) before 108153243 ("fix keep alive", v0.11.8)
# and read as it is from then (``time.Duration(t * float64(time.Second))``).
_EXACT_NUMBER_FROM = (0, 11, 8)
_GO_UNITS = {
    "ns": 1e-9,
    **dict.fromkeys(("us", "µs", "μs"), 1e-6),
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_DURATION = re.compile(r"[-+]?(0|((\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)")
_GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _keep_alive(keep_alive: Any, version: str) -> float | None:
    """``keep_alive`` in seconds as Ollama at ``version`` reads it (``inf``: for ever), or None
    where it is unset or not modelled.

    api/types.go, ``Duration.UnmarshalJSON``: a negative number is ``math.MaxInt64``; a
    non-negative one is seconds, whole ones only before v0.11.8 (:data:`_EXACT_NUMBER_FROM`);
    a string is a Go duration (``time.ParseDuration``), negative: ``math.MaxInt64`` too.
    """
    if isinstance(keep_alive, int | float) and not isinstance(keep_alive, bool):
        if keep_alive < 0:
            return math.inf
        exact = _version(version) >= _EXACT_NUMBER_FROM
        return float(keep_alive) if exact else float(int(keep_alive))
    if isinstance(keep_alive, str) and _GO_DURATION.fullmatch(keep_alive):
        parts = _GO_DURATION_PART.findall(keep_alive)
        seconds = sum(float(n) * _GO_UNITS[unit] for n, unit in parts)
        return math.inf if keep_alive.startswith("-") and seconds > 0 else seconds
    return None


def _expires_on_load(keep_alive: Any, version: str) -> bool:
    """Whether a chat without messages unloads the model rather than loading it.

    server/routes.go, ``ChatHandler`` ("expire the runner"): ``int(req.KeepAlive.Seconds())
    == 0``, any ``keep_alive`` under a second, before v0.11.8 (108153243) and again from
    v0.12.0 (8b894933a, "engine: add remote proxy") until v0.12.4 (35ac4eb12, "fix keep
    alive"); ``req.KeepAlive.Duration == 0`` otherwise.
    """
    seconds = _keep_alive(keep_alive, version)
    if seconds is None:
        return False
    v = _version(version)
    if v < _EXACT_NUMBER_FROM or (0, 12, 0) <= v < (0, 12, 4):
        return 0 <= seconds < 1
    return seconds == 0


def _expires_after_chat(keep_alive: Any, version: str) -> bool:
    """Whether the model is unloaded as soon as a chat is answered: server/sched.go, a runner
    gone idle with ``sessionDuration <= 0`` is unloaded at once. (A positive one keeps it that
    long; that expiry is not modelled: the model stays.)"""
    return _keep_alive(keep_alive, version) == 0


_THINK_LEVELS = ("high", "medium", "low")
# api/types.go, ThinkValue.UnmarshalJSON: "max" is accepted from c2ebb4d57 (v0.21.3-rc0).
_THINK_MAX_FROM = (0, 21, 3)


def _think_error(think: Any, version: str) -> str | None:
    """Why Ollama at ``version`` refuses ``think`` as it binds the request, or None.

    api/types.go, ``ThinkValue.UnmarshalJSON``: a bool, else one of the levels, else an error;
    JSON null leaves the pointer nil without calling it. Go's ``encoding/json`` hands the error
    back as it is, and ``ChatHandler`` answers it as a 400 (``ShouldBindJSON``).
    """
    levels = _THINK_LEVELS + (("max",) if _version(version) >= _THINK_MAX_FROM else ())
    if think is None or isinstance(think, bool) or think in levels:
        return None
    allowed = ", ".join(f'"{level}"' for level in levels) + ", true, or false"
    if isinstance(think, str):
        return f'invalid think value: "{think}" (must be {allowed})'
    return f"think must be a boolean or string ({allowed})"


def _think_on(think: Any) -> bool:
    """``ThinkValue.Bool()`` (api/types.go) of a ``think`` that was read: true or any level."""
    return think is True or isinstance(think, str)


# The built-in parsers (model/parsers/parsers.go, ParserForName) and their HasThinkingSupport();
# a PARSER not named here has none: ParserForName returns nil.
_PARSER_THINKS = {
    **dict.fromkeys(
        ("qwen3", "qwen3-coder", "qwen3-vl-instruct", "ministral", "passthrough", "olmo3"),
        False,
    ),
    **dict.fromkeys(("functiongemma", "gemma4-no-thinking", "glm-ocr", "lfm2"), False),
    **dict.fromkeys(
        ("qwen3-thinking", "qwen3.5", "ornith", "qwen3-vl-thinking", "harmony", "cogito"), True
    ),
    **dict.fromkeys(("deepseek3", "olmo3-think", "nemotron-3-nano", "nemotron-3.5-nano"), True),
    **dict.fromkeys(("glm-4.7", "gemma4", "lfm2-thinking", "laguna", "poolside-v1"), True),
    **dict.fromkeys(("cohere", "glimmer"), True),
}


def _version(text: str) -> tuple[int, ...]:
    """``0.12.4`` (or ``0.12.4-rc7``) as a tuple to compare; unreadable: the newest."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(n) for n in found.groups()) if found else (1 << 31,)


def _cut(text: str, tokens: int | None) -> tuple[str, int, bool]:
    """``text`` within ``tokens`` (None: no limit): (what is generated, its tokens, cut)."""
    words = text.split(" ") if text else []
    if tokens is None or len(words) <= tokens:
        return text, len(words), False
    return " ".join(words[: max(tokens, 0)]), max(tokens, 0), True


def _pieces(text: str) -> list[str]:
    """``text`` in pieces of four words, as a stream sends it (none for no text)."""
    words = text.split(" ") if text else []
    pieces = [" ".join(words[i : i + 4]) + " " for i in range(0, len(words), 4)]
    if pieces:
        pieces[-1] = pieces[-1][:-1]
    return pieces


# server/routes.go, GenerateRoutes (read at v0.6.0, v0.12.6 and fb3076099): the routes this
# fake serves, each path with its methods in the order of gin's method trees, each made at its
# method's first route (``r.HEAD("/", …)`` first, then ``r.GET("/", …)``, then
# ``r.POST("/api/pull", …)``). Ollama's router is gin v1.10.0 (go.mod, at all three): a path no
# method has is answered ``404 page not found``, Content-Type ``text/plain`` (gin.go,
# ``handleHTTPRequest`` then ``serveError`` with ``default404Body``). From v0.6.9-rc0 (commit
# 4090aca97, "server: send 405 instead of 404 for unallowed methods", first released in v0.7.0)
# ``r.HandleMethodNotAllowed = true``, and a path that other methods have is answered ``405
# method not allowed`` with an ``Allow`` header naming them (``default405Body``); before, it is
# the 404. The routes Ollama has and this fake does not serve (``/api/generate``, ``/api/show``
# …) are answered as paths it does not have; gin's redirect of a path with a slash too many or
# too few (``RedirectTrailingSlash``) and the CORS middleware's answer to a preflight are not
# modelled.
_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("HEAD", "GET"),
    "/api/version": ("HEAD", "GET"),
    "/api/tags": ("HEAD", "GET"),
    "/api/chat": ("POST",),
}
_METHOD_NOT_ALLOWED_FROM = (0, 6, 9)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class FakeOllama(Running):
    """A scriptable Ollama on 127.0.0.1 (a free port, kept across :meth:`stop`/:meth:`start`).

    Args:
        models: The names ``/api/tags`` lists.
        version: What ``/api/version`` answers.
    """

    def __init__(
        self, *, models: tuple[str, ...] = ("llama3.2:latest",), version: str = "0.6.0"
    ) -> None:
        self.models = list(models)
        self.thinking_models: set[str] = set()
        """The models that can think (``thinking`` among their capabilities), full names."""
        self.always_thinking: set[str] = set()
        """Those of :attr:`thinking_models` that think whatever ``think`` says: gpt-oss, whose
        harmony format has no way to turn reasoning off, thinks with ``think: false`` too
        (ollama/ollama#11751)."""
        self.parsers: dict[str, str] = {}
        """Each model's built-in parser (its Modelfile's ``PARSER``), by full name."""
        self.version = version
        self.authorization: str | None = None
        """The ``Authorization`` header the proxy in front wants on every request; None: no
        proxy, every request reaches Ollama."""
        self.port = 0
        self._default = reply()
        self.loading = Behaviour(content="")
        """How a model loads, for a load (a chat without messages) or for the first chat that
        needs it: its status and delay."""
        self.model_loads: list[tuple[str, str]] = []
        """Each load of a model, in order: (its name, ``"load"`` or ``"chat"``: what asked)."""
        self._loaded: set[str] = set()
        self._load_lock = threading.Lock()
        self._queue: deque[Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server: LoopbackServer | None = None
        self._connections: set[socket.socket] = set()

    # Lifecycle

    def start(self) -> Self:
        """Listen (again) on :attr:`port`; a free port the first time."""
        handler = type("Handler", (_Handler,), {"owner": self})
        self._released.clear()
        self._server = LoopbackServer(handler, port=self.port, name="fake-ollama").start()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        """Close the port: clients now get "connection refused". Slow answers are cut short.

        Open connections are cut too, as when the Ollama process ends: a kept-alive one would
        otherwise go on answering.
        """
        self._released.set()
        self._loaded.clear()  # the process ended: nothing is loaded when it comes back
        if self._server is not None:
            self._server.stop()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        """The base URL to give ``ollama.AsyncClient(host=...)``."""
        return f"http://127.0.0.1:{self.port}"

    # Script

    def answer(self, behaviour: Behaviour) -> None:
        """How every chat is answered once the queue is empty."""
        with self._lock:
            self._default = behaviour

    def reply_with(self, content: str | dict[str, Any]) -> None:
        """Answer every chat with ``content`` (a shorthand for ``answer(reply(content))``)."""
        self.answer(reply(content))

    def enqueue(self, *behaviours: Behaviour) -> None:
        """How the next chats are answered, one behaviour each, in order."""
        with self._lock:
            self._queue.extend(behaviours)

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else self._default

    # Records

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def chat_requests(self) -> list[Any]:
        """The JSON bodies of the ``/api/chat`` requests received that ask for a reply."""
        return [body for body in self._chats() if _asks_for_reply(body)]

    @property
    def load_requests(self) -> list[Any]:
        """The JSON bodies of the ``/api/chat`` requests without messages: loads."""
        return [body for body in self._chats() if not _asks_for_reply(body)]

    def _chats(self) -> list[Any]:
        return [r.json for r in self.requests if r.path == "/api/chat"]

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _opened(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOllama
    server_version = "FakeOllama/1.0"
    # Ollama serves through Go's net/http: HTTP/1.1 with keep-alive on by default
    # (net/http/server.go, Server.SetKeepAlivesEnabled: "By default, keep-alives are always
    # enabled"), on connections with Nagle's algorithm off (net/tcpsock_posix.go, newTCPConn:
    # setNoDelay(fd, true)). A client reuses its connection, as it does with the real one.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.owner._opened(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._opened(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _read(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _refused_by_proxy(self) -> bool:
        """Answer the proxy's 401 and say True where :attr:`FakeOllama.authorization` is set and
        the request does not carry it."""
        wanted = self.owner.authorization
        if wanted is None or self.headers.get("Authorization") == wanted:
            return False
        body = b"<html><body><h1>401 Unauthorized</h1></body></html>"
        self._send(401, body, "text/html", {"WWW-Authenticate": 'Basic realm="ollama"'})
        return True

    def _record(self, body: Any) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.owner._record(RecordedRequest(self.command, self.path, headers, body))

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # Go's net/http answers HEAD with the head GET would have, Content-Length included,
        # and no body (net/http/server.go, chunkWriter.Write: "Eat writes" for HEAD).
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data).encode())

    def _unrouted(self) -> bool:
        """Answer gin's 404 or 405 and say True where no route of :data:`_ROUTES` takes the
        request's method and path (its query aside, as gin routes ``URL.Path``)."""
        methods = _ROUTES.get(urlsplit(self.path).path, ())
        if self.command in methods:
            return False
        allowed = [method for method in methods if method != self.command]
        if allowed and _version(self.owner.version) >= _METHOD_NOT_ALLOWED_FROM:
            self._send(405, b"405 method not allowed", "text/plain", {"Allow": ", ".join(allowed)})
        else:
            self._send(404, b"404 page not found", "text/plain")
        return True

    def do_GET(self) -> None:
        self._record(None)
        if self._refused_by_proxy() or self._unrouted():
            return
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._send_json(200, {"version": self.owner.version})
        else:  # /api/tags
            models = [
                {
                    "name": name,
                    "model": name,
                    "modified_at": _now(),
                    "size": 2_019_393_189,
                    "digest": "a80c4f17acd5" + "0" * 52,
                    "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B"},
                }
                for name in self.owner.models
            ]
            self._send_json(200, {"models": models})

    do_HEAD = do_GET  # the same handlers as GET (server/routes.go), without a body (_send)

    def _unserved(self) -> None:
        """A method no route of this fake has: gin's 404 or 405 (:data:`_ROUTES`), where
        ``http.server`` would answer 501."""
        self._read()  # the body, so that the kept-alive connection reads the next request
        self._record(None)
        if not self._refused_by_proxy():
            self._unrouted()

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = _unserved

    def do_POST(self) -> None:
        raw = self._read()
        try:
            body = _first_value(raw) if raw.strip() else None
        except ValueError:
            body = None
        self._record(body)
        if self._refused_by_proxy() or self._unrouted():
            return
        # server/routes.go, ChatHandler: the body is bound first of all (``ShouldBindJSON``;
        # ``think`` is read then), then the model's name is parsed, before it is looked up.
        if not raw.strip(_JSON_SPACE.encode()):  # Go skips only these four
            self._send_json(400, {"error": "missing request body"})
            return
        if (error := _bind_error(raw)) is not None:
            self._send_json(400, {"error": error})
            return
        request = body if isinstance(body, dict) else {}
        if (error := _think_error(request.get("think"), self.owner.version)) is not None:
            self._send_json(400, {"error": error})
            return
        if (error := _name_error(request.get("model"), self.owner.version)) is not None:
            self._send_json(400, {"error": error})
            return
        # The name parsed is the one looked up: from v0.18.0, trimmed and without its source.
        request = {**request, "model": _base_name(request["model"], self.owner.version)}
        if not _asks_for_reply(body):
            self._answer_load(request)
            return
        named = str(request.get("model", ""))
        model = _canonical(named)
        # Ollama's ChatHandler (server/routes.go): a model it does not have is a 404 naming it
        # as the request did, before anything is scheduled; thinking asked of a model that
        # cannot is a 400, before scheduleRunner too; a model it has must be loaded first
        # (scheduleRunner): the first chat waits for that.
        if model not in self._models():
            self._send_json(404, {"error": f"model '{named}' not found"})
            return
        if self._refuses_thinking(request):
            return
        if not self._schedule(model, "chat"):
            return
        behaviour = self.owner._next_behaviour()
        if behaviour.delay and self.owner._released.wait(behaviour.delay):
            self.close_connection = True  # stopped while waiting: drop it unanswered
            return
        # The client may have given up (its timeout) before the answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer_chat(request, behaviour)
        if _expires_after_chat(request.get("keep_alive"), self.owner.version):
            self.owner._loaded.discard(model)

    def _models(self) -> set[str]:
        return {_canonical(name) for name in self.owner.models}

    def _can_think(self, model: str) -> bool:
        return _canonical(model) in {_canonical(name) for name in self.owner.thinking_models}

    def _refuses_thinking(self, request: dict[str, Any]) -> bool:
        """Answer the 400 and say True where thinking is asked of a model that cannot think
        (server/routes.go, ChatHandler: ``req.Think != nil && req.Think.Bool()`` without
        ``model.CapabilityThinking``, checked before ``scheduleRunner``)."""
        model = str(request.get("model", ""))
        if self._can_think(model) or not _think_on(request.get("think")):
            return False
        self._send_json(400, {"error": f'"{model}" does not support thinking'})
        return True

    def _schedule(self, model: str, kind: str) -> bool:
        """Load ``model`` unless it is loaded, as :attr:`FakeOllama.loading` says; False when
        the request has been answered (a failed load) or dropped (stopped while loading)."""
        # One load at a time; a request that waited for it finds the model loaded (the
        # scheduler's pending requests, server/sched.go, wait for the runner being loaded).
        with self.owner._load_lock:
            if model in self.owner._loaded:
                return True
            behaviour = self.owner.loading
            if behaviour.delay and self.owner._released.wait(behaviour.delay):
                self.close_connection = True  # stopped while loading: dropped unanswered
                return False
            if behaviour.status != 200:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._send_json(behaviour.status, {"error": behaviour.content})
                return False
            with self.owner._lock:
                self.owner._loaded.add(model)
                self.owner.model_loads.append((model, kind))
            return True

    def _answer_load(self, request: dict[str, Any]) -> None:
        # Ollama's ChatHandler (server/routes.go): a model it does not have is a 404; with no
        # messages and keep_alive 0 (under a second, on some versions: _expires_on_load) the
        # model is unloaded; otherwise thinking asked of a model
        # that cannot is a 400, then the model's runner is scheduled (loaded unless it is,
        # which is the wait) and the answer is one JSON object, whatever ``stream`` says, with
        # nothing generated: done_reason "load".
        model = str(request.get("model", ""))
        if _canonical(model) not in self._models():
            self._send_json(404, {"error": f"model '{model}' not found"})
            return
        expires = _expires_on_load(request.get("keep_alive"), self.owner.version)
        done_reason = "unload" if expires else "load"
        if done_reason == "unload":
            self.owner._loaded.discard(_canonical(model))
        elif self._refuses_thinking(request) or not self._schedule(_canonical(model), "load"):
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": done_reason,
                },
            )

    def _answer_chat(self, request: dict[str, Any], behaviour: Behaviour) -> None:
        content = behaviour.content
        text = json.dumps(content) if isinstance(content, dict) else content
        if behaviour.body is not None:
            self._send(behaviour.status, behaviour.body)
            return
        if behaviour.status != 200:
            self._send_json(behaviour.status, {"error": text})
            return
        # ``think`` was read and checked against the model before (do_POST): unset is on for a
        # model that can think, and a model that cannot was asked for no thinking.
        think = request.get("think")
        model = str(request.get("model", ""))
        always = _canonical(model) in {_canonical(name) for name in self.owner.always_thinking}
        thinks = self._can_think(model) and (think is None or _think_on(think) or always)
        thinking = behaviour.thinking if thinks else ""
        if behaviour.unconstrained is not None and not self._constrained(request, thinking):
            text = behaviour.unconstrained
        final = self._final(request, text, thinking)
        if behaviour.trickle:
            self._trickle(json.dumps(final).encode(), behaviour.trickle)
            return
        if not request.get("stream", True):
            self._send_json(200, final)
            return
        self._stream(final)

    def _constrained(self, request: dict[str, Any], thinking: str) -> bool:
        """Whether Ollama applies ``format`` to the reply it sends (server/routes.go,
        ChatHandler; the rules are in the module docstring)."""
        if request.get("format") is None:
            return False
        version = _version(self.owner.version)
        if version < (0, 12, 4):
            return True
        model = _canonical(str(request.get("model", "")))
        parser = {_canonical(name): p for name, p in self.owner.parsers.items()}.get(model)
        builtin = parser in _PARSER_THINKS  # ParserForName(m.Config.Parser) != nil
        think = request.get("think")
        # thinkingState: think on (unset is on for a model that can think) and the template's
        # thinking tags, which every model that can think has here.
        generic = think is None or _think_on(think)
        thinking_models = {_canonical(name) for name in self.owner.thinking_models}
        if model not in thinking_models or not (builtin or generic):
            return True
        if version >= (0, 31, 2):
            force = builtin and _PARSER_THINKS[str(parser)] and think is False
        elif version >= (0, 21, 1):
            force = parser == "gemma4" and think is False
        else:
            force = False
        # Withheld (currentFormat = nil) until thinking text is followed by content; then the
        # request is made again with the format, and that is the reply sent.
        return force or bool(thinking)

    def _trickle(self, body: bytes, pause: float) -> None:
        """``body`` a few bytes at a time: each read arrives well within a read timeout."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 16):
            if self.owner._released.wait(pause):
                return
            self.wfile.write(body[start : start + 16])
            self.wfile.flush()

    def _final(self, request: dict[str, Any], text: str, thinking: str) -> dict[str, Any]:
        """The last (or only) chunk: thinking first, then the reply, within num_predict."""
        model = str(request.get("model", ""))
        options = request.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        budget = limit if isinstance(limit, int) and limit > 0 else None  # -1, unset: none
        thinking, thought, cut = _cut(thinking, budget)
        if cut:
            text, said = "", 0
        else:
            text, said, cut = _cut(text, None if budget is None else budget - thought)
        message = {"role": "assistant", "content": text}
        if thinking:  # omitempty in api.Message
            message["thinking"] = thinking
        return {
            "model": model,
            "created_at": _now(),
            "message": message,
            "done": True,
            "done_reason": "length" if cut else "stop",
            "total_duration": 1_000_000,
            "load_duration": 100_000,
            "prompt_eval_count": 42,
            "prompt_eval_duration": 200_000,
            "eval_count": thought + said,
            "eval_duration": 700_000,
        }

    def _stream(self, final: dict[str, Any]) -> None:
        """Streaming (the API's default): the thinking, then the content, in pieces; then a
        final empty chunk."""
        model, message = final["model"], final["message"]
        lines = [
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": "", key: piece}
                if key == "thinking"
                else {"role": "assistant", key: piece},
                "done": False,
            }
            for key in ("thinking", "content")
            for piece in _pieces(message.get(key, ""))
        ]
        lines.append({**final, "message": {"role": "assistant", "content": ""}})
        payload = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        self._send(200, payload, "application/x-ndjson")
