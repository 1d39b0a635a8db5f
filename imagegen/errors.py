"""The one error hierarchy of imagegen.

Every error knows whether a retry can help and which HTTP status it maps to. Errors are
translated to status codes only at the function edge (``functions/``), never inside the library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

__all__ = [
    "ConfigurationError",
    "DependencyUnavailable",
    "Forbidden",
    "ImageGenError",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "RouteNotFound",
    "Unauthenticated",
    "UnsupportedMediaType",
    "first_line",
]


MAX_MESSAGE = 1000
"""Characters of an error's message kept; the rest is said as ``…``."""
MAX_ERRORS = 20
"""Field entries an error lists; the last says how many more there were."""
MAX_ENTRY = 200
"""Characters kept of each field name and field message."""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ImageGenError(Exception):
    """Base class of every error imagegen's calls raise (building a model or ``Settings`` from
    bad values raises pydantic's ``ValidationError``, which names them).

    Attributes:
        code: A short machine-readable name, stable across releases.
        status: The HTTP status this error maps to at the function edge.
        retryable: Whether delivering the same input again can succeed.
        retry_after: Seconds a caller should wait before retrying, when retryable (default:
            the class's ``default_retry_after``).
        errors: One entry per offending field or setting: ``{"field": ..., "message": ...}``.
    """

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    default_retry_after: ClassVar[float | None] = None

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        # Bounded: a message or a field name may quote the input, and the error is answered,
        # logged and sent on as an event (a broker refuses a record over its limit, 1 MB on
        # Kafka): 80,000 unknown fields, or a key of a megabyte, are said in a few KiB.
        message = _cut(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        self.retry_after = self.default_retry_after if retry_after is None else retry_after
        errors = errors or []
        self.errors = [
            {name: _cut(str(text), MAX_ENTRY) for name, text in entry.items()}
            for entry in errors[:MAX_ERRORS]
        ]
        if len(errors) > MAX_ERRORS:
            more = len(errors) - MAX_ERRORS
            self.errors[-1] = {"field": "…", "message": f"{more + 1} more, not listed"}

    @property
    def fields(self) -> list[str]:
        """Names of the offending fields or settings, in the order found."""
        return [e["field"] for e in self.errors]

    def explained(self, name: Callable[[str], str] = str) -> str:
        """The message with the reasons of its fields it does not say already, as one line
        (``invalid settings: IMAGEGEN_TIMEZONE (unknown IANA time zone)``): what a person
        reads where the JSON body's ``errors`` are not shown (the CLI, a start-up log). Each
        field is named as ``name`` shows it (a setting as its variable)."""
        said = [e for e in self.errors if e.get("message") and e["message"] not in self.message]
        reasons = "; ".join(f"{name(e['field'])}: {e['message']}" for e in said)
        if said and all(self.message.endswith(name(e["field"])) for e in said):
            # The one field the message ends naming, each of its reasons (a list's entries,
            # each named by its place) without its name again.
            reasons = "; ".join(e["message"] for e in said)
        return f"{self.message} ({reasons})" if reasons else self.message

    def to_dict(self) -> dict[str, Any]:
        """The JSON body describing this error (never a stack trace)."""
        body: dict[str, Any] = {
            "error": self.code,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        if self.errors:
            body["errors"] = self.errors
        return body


class InvalidRequest(ImageGenError):
    """The input is wrong; sending it again will fail again.

    Args:
        message: A readable summary.
        errors: One entry per offending field: ``{"field": "width", "message": "..."}``.
    """

    code = "invalid_request"
    status = 400
    retryable = False

    def __init__(self, message: str, *, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message, errors=errors)


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"
    status = 415


class RouteNotFound(ImageGenError):
    """No such path on a function (not an invalid request: nothing was read)."""

    code = "not_found"
    status = 404


class MethodNotAllowed(ImageGenError):
    """A method the path does not take (RFC 9110: a 405 says which it does, in ``Allow``).

    Args:
        method: The method refused, named as the part at fault.
        allowed: The methods the path takes.
    """

    code = "method_not_allowed"
    status = 405

    def __init__(self, method: str, *, allowed: Sequence[str]) -> None:
        super().__init__(
            f"{method} is not allowed: {', '.join(allowed)}",
            errors=[{"field": "method", "message": f"{method} is not allowed"}],
        )
        self.allowed = tuple(allowed)


class Unauthenticated(ImageGenError):
    """No credentials, or credentials that do not verify (RFC 6750: a 401 with a challenge).

    Args:
        message: What was wrong, never the credential itself.
        error: The RFC 6750 error code for ``WWW-Authenticate`` (None when none was sent).
    """

    code = "unauthenticated"
    status = 401
    retryable = False

    def __init__(self, message: str, *, error: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.error = error

    @property
    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value of the answer."""
        if self.error is None:
            return 'Bearer realm="imagegen"'
        return f'Bearer realm="imagegen", error="{self.error}"'


class Forbidden(ImageGenError):
    """Valid credentials that do not admit this caller here (e.g. another audience)."""

    code = "forbidden"
    status = 403
    retryable = False

    @property
    def challenge(self) -> str:
        return 'Bearer realm="imagegen", error="insufficient_scope"'


class Overloaded(ImageGenError):
    """The stage is at capacity; retry later."""

    code = "overloaded"
    status = 429
    retryable = True
    default_retry_after = 5.0


class DependencyUnavailable(ImageGenError):
    """A dependency (Ollama, object storage, the model) is unreachable or not ready."""

    code = "dependency_unavailable"
    status = 503
    retryable = True
    default_retry_after = 10.0


class ConfigurationError(ImageGenError):
    """The settings cannot work: every request fails alike until the environment is fixed.

    A function answers 503 (not ready, retried) rather than 400: the requests are fine.

    Args:
        message: A readable summary, naming settings but never echoing their values.
        errors: One entry per offending setting: ``{"field": "storage_url", "message": ...}``.
    """

    code = "not_configured"
    status = 503
    retryable = True
    default_retry_after = 30.0

    @classmethod
    def of(
        cls, summary: str, exc: Exception, *, name: Callable[[str], str] = str
    ) -> ConfigurationError:
        """``exc``, raised while reading the settings, as ``summary: reason`` (no summary: the
        reason alone).

        The reason names the settings at fault (each as ``name`` shows it), never their values
        (they may be secrets); a rule across settings is given in its own words.
        """
        from pydantic import ValidationError
        from pydantic_settings import SettingsError

        if isinstance(exc, SettingsError):
            # A value a settings source could not decode (bad JSON for a dict or list setting);
            # pydantic-settings names the field only in its message.
            import re

            field = re.search(r'field "([^"]+)"', str(exc))
            cause = exc.__cause__
            why = f"cannot be read ({first_line(cause)})" if cause else "cannot be read"
            errors = [{"field": field[1], "message": why}] if field else []
            reason = f"invalid settings: {name(field[1])}" if field else first_line(exc)
        elif isinstance(exc, ValidationError):
            from imagegen.validation import field_errors

            found = field_errors(exc)
            # Each named as the reason names it: the variable set (OLLAMA_HOST, say, where
            # pydantic reports the first of a setting's aliases).
            errors = [_named(e, name) for e in found if e["field"] != "body"]
            named = ", ".join(dict.fromkeys(e["field"].split(".")[0] for e in errors))
            across = [e["message"] for e in found if e["field"] == "body"]
            reason = "invalid settings: " + "; ".join([named, *across] if named else across)
        elif isinstance(exc, ImageGenError):
            # Refused by what reads the settings (storage, the plugins), in its own words: they
            # name the variable and say how to fix it (``the minio preset needs
            # IMAGEGEN_S3_ENDPOINT_URL, e.g. …``), as the CLI shows them. Its fields are
            # settings, each named as ``name`` shows it; the message names one, or is said
            # after them.
            errors = [_named(e, name) for e in exc.errors]
            variables = list(dict.fromkeys(e["field"].split(".")[0] for e in errors))
            reason = exc.message
            if variables and not any(variable in reason for variable in variables):
                reason = f"invalid settings: {', '.join(variables)} ({reason})"
        else:
            errors, reason = [], type(exc).__name__
        return cls(f"{summary}: {reason}" if summary else reason, errors=errors)


def _named(error: dict[str, str], name: Callable[[str], str]) -> dict[str, str]:
    head, dot, rest = error["field"].partition(".")
    return {**error, "field": f"{name(head)}{dot}{rest}"}


class InternalError(ImageGenError):
    """A bug or an unexpected failure; not retried by default."""

    code = "internal"
    status = 500
    retryable = False


class NotFound(ImageGenError):
    """A referenced object does not exist (e.g. the image a rendered event points to)."""

    code = "not_found"
    status = 404
    retryable = False


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
