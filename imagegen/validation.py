"""Turning untrusted input into models, with errors that name every offending field."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from imagegen.errors import InvalidRequest

__all__ = ["MAX_JSON_DEPTH", "check_json_value", "field_errors", "loads", "parse_model"]

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in any JSON input (events are ~4 deep)."""


def loads(
    body: bytes | str,
    *,
    field: str = "body",
    max_depth: int = MAX_JSON_DEPTH,
    repeated: list[str] | None = None,
) -> Any:
    """Parse untrusted JSON: UTF-8 only (no byte order mark), nesting bounded, ``NaN`` and
    ``Infinity`` refused. What is wrong is said of the input: where the parser stopped and why,
    never the interpreter's own wording.

    The C parser guards its own recursion (a ``RecursionError`` past the interpreter's limit,
    caught here); anything deeper than ``max_depth`` is refused after parsing, so no serializer
    or validator further on ever meets a structure deep enough to exhaust the stack.

    A name given twice in one object is taken, the last value kept, as ``json`` takes it: RFC
    8259 (section 4) has names unique, a SHOULD, and leaves what a parser makes of others
    undefined.

    Args:
        repeated: Where given, each name given again in an object is appended to it.

    Raises:
        InvalidRequest: naming ``field`` and saying what is wrong.
    """
    if isinstance(body, bytes | bytearray):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(field, f"not UTF-8 (byte {exc.start})") from None
    else:
        text = body
    if text.startswith("\ufeff"):
        # RFC 8259, section 8.1: a JSON text sent over a network carries no byte order mark.
        raise _bad(field, "starts with a byte order mark (U+FEFF)")
    try:
        hook = None if repeated is None else _noting_repeats(repeated)
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=hook)
    except RecursionError:
        raise _bad(field, f"nested deeper than {max_depth}") from None
    except ValueError as exc:
        raise _bad(field, _reason(exc)) from None
    try:
        check_json_value(value, max_depth=max_depth)
    except ValueError as exc:
        raise _bad(field, str(exc)) from None
    return value


def check_json_value(value: Any, *, max_depth: int = MAX_JSON_DEPTH, text: bool = False) -> None:
    """Raise ValueError if ``value`` nests deeper than ``max_depth`` or holds NaN/Infinity.

    For data that arrived already parsed (by pydantic or a caller of the library). Walks one
    level at a time, without recursion. With ``text``, a key or string that is no UTF-8 text (a
    lone surrogate, which JSON's ``\\ud800`` escape makes) is refused too: free-form values
    that are stored, digested or sent on as UTF-8 could not be.
    """
    level: list[Any] = [value]
    depth = 0
    while level:
        depth += 1
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is dict:
                below.extend(item.values())
                if text:
                    below.extend(item)
            elif kind is list or kind is tuple:
                below.extend(item)
            elif kind is float and not math.isfinite(item):
                raise ValueError("NaN and Infinity are not JSON numbers")
            elif kind is str and text and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone surrogate: not UTF-8 text") from None
        if depth >= max_depth and any(type(i) in _CONTAINERS for i in below):
            raise ValueError(f"nested deeper than {max_depth}")
        level = below


_CONTAINERS = (dict, list, tuple)


def _noting_repeats(repeated: list[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(members)  # the last of each name, as json.loads keeps it
        if len(value) < len(members):
            seen: set[str] = set()
            for name, _ in members:
                if name in seen:
                    repeated.append(name)
                seen.add(name)
        return value

    return pairs


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not a JSON number")


def _reason(exc: ValueError) -> str:
    """What is wrong with a body ``json.loads`` refused, said of the body alone."""
    if isinstance(exc, _NonFinite):
        return str(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
    # The parser's one other ValueError: an integer longer than the interpreter converts
    # (int_max_str_digits, https://docs.python.org/3/library/stdtypes.html#int-max-str-digits),
    # whose own message is advice to a programmer, not to the sender.
    return f"holds an integer of more than {sys.get_int_max_str_digits()} digits"


def _bad(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", errors=[{"field": field, "message": message}])


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` entry per problem, the field as a dotted path."""
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"].removeprefix("Value error, ")
        out.append({"field": field, "message": message})
    return out


def parse_model(model: type[M], data: Any, *, strict: bool | None = None) -> M:
    """Validate ``data`` (a mapping, JSON text or bytes) as ``model``.

    Args:
        strict: Overrides the model's own strictness (None: as the model says).

    Raises:
        InvalidRequest: naming every offending field.
    """
    try:
        if isinstance(data, str | bytes | bytearray):
            return model.model_validate_json(data, strict=strict)
        return model.model_validate(data, strict=strict)
    except ValidationError as exc:
        errors = field_errors(exc)
        if any(e["message"].startswith("Invalid JSON") for e in errors):
            raise InvalidRequest("body is not valid JSON", errors=errors) from None
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise InvalidRequest(f"invalid {model.__name__}: {fields}", errors=errors) from None
