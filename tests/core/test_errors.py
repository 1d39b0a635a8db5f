from __future__ import annotations

import pytest

from imagegen.errors import (
    DependencyUnavailable,
    ImageGenError,
    InternalError,
    InvalidRequest,
    NotFound,
    Overloaded,
)


@pytest.mark.parametrize(
    ("error", "status", "retryable"),
    [
        (InvalidRequest("bad"), 400, False),
        (NotFound("gone"), 404, False),
        (Overloaded("busy"), 429, True),
        (DependencyUnavailable("down"), 503, True),
        (InternalError("bug"), 500, False),
    ],
)
def test_status_and_retry(error: ImageGenError, status: int, retryable: bool) -> None:
    assert isinstance(error, ImageGenError)
    assert (error.status, error.retryable) == (status, retryable)
    body = error.to_dict()
    assert body["retryable"] is retryable
    assert ("retry_after" in body) is retryable


def test_invalid_request_lists_fields() -> None:
    error = InvalidRequest("invalid", errors=[{"field": "width", "message": "too small"}])
    assert error.fields == ["width"]
    assert error.to_dict()["errors"] == [{"field": "width", "message": "too small"}]
