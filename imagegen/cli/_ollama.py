"""What the command line says about Ollama: one sentence, and what to do about it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from imagegen._redact import redact_url

if TYPE_CHECKING:
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = ["Advice", "check_ollama", "ollama_advice"]


class Advice(NamedTuple):
    """A check's outcome as a person reads it."""

    status: str  # ok, warning or error
    summary: str  # one short sentence: what is the case
    next_step: str  # what to do about it, as an imperative; empty when nothing is needed


_HUNG = ("no answer within", "TimeoutError", "ReadTimeout")
"""How a check's error begins where Ollama's host took the connection and did not answer:
:meth:`imagegen.enhance.llm.OllamaEnhancer.check` says ``no answer within 10s``; the
exception's type where a caller says it as ``_said`` does."""

_REFUSED = re.compile(r"^ResponseError: .*\(status code: (401|403)\)$", re.DOTALL)
"""A check's error where the server (Ollama, or a proxy in front of it) refused the request's
credentials: ``_said`` (imagegen/enhance/llm.py) ends an error status with its code."""


def ollama_advice(info: Mapping[str, object], settings: Settings) -> Advice:
    """Advice from the enhance stage's Ollama check (``reachable``, ``model_available``)."""
    host, model = redact_url(settings.ollama_host), settings.ollama_model
    if not info.get("reachable"):
        error = str(info.get("error", ""))
        if refused := _REFUSED.match(error):
            return Advice(
                "warning",
                f"The server at {host} wants credentials or refuses those sent (HTTP {refused[1]})",
                "check the user-info in IMAGEGEN_OLLAMA_HOST (http://user:password@host),"
                " or OLLAMA_API_KEY",
            )
        # Something is there, but does not answer as Ollama: a hung server (the check's own
        # "no answer within …s", which it says of either timeout), or another service (an HTTP
        # error status for /api/tags: ollama's ResponseError; a body that is no listing).
        hung = error.startswith(_HUNG)
        if hung or error.startswith(("unreadable", "ResponseError")):
            what = "does not answer in time" if hung else "answers, but not as Ollama"
            return Advice(
                "warning",
                f"The server at {host} {what}",
                "check IMAGEGEN_OLLAMA_HOST, or restart Ollama",
            )
        return Advice("warning", f"Ollama is not running at {host}", "start it with `ollama serve`")
    if info.get("model_available") is False:
        return Advice(
            "warning", f"Ollama at {host} has no model {model}", f"run `ollama pull {model}`"
        )
    return Advice("ok", f"Ollama runs at {host} with {model}", "")


async def check_ollama(service: ImageGenService) -> Advice:
    """Ask Ollama now; never raises."""
    from imagegen.errors import ImageGenError

    try:
        info = await service.enhance_stage.check()
    except ImageGenError as exc:
        info = {"reachable": False, "error": exc.message}
    return ollama_advice(info, service.settings)
