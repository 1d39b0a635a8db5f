"""Turning untrusted input into models, with errors that name every offending field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from imagegen.errors import InvalidRequest

__all__ = ["field_errors", "parse_model"]

M = TypeVar("M", bound=BaseModel)


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """One ``{"field", "message"}`` entry per problem, the field as a dotted path."""
    out = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "(body)"
        message = err["msg"].removeprefix("Value error, ")
        out.append({"field": field, "message": message})
    return out


def parse_model(model: type[M], data: Any) -> M:
    """Validate ``data`` (a mapping, JSON text or bytes) as ``model``.

    Raises:
        InvalidRequest: naming every offending field.
    """
    try:
        if isinstance(data, str | bytes | bytearray):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc)
        if any(e["message"].startswith("Invalid JSON") for e in errors):
            raise InvalidRequest("body is not valid JSON", errors=errors) from None
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise InvalidRequest(f"invalid {model.__name__}: {fields}", errors=errors) from None
