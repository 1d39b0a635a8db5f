from __future__ import annotations

import pytest

from imagegen.errors import (
    ConfigurationError,
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


def _settings_error(**values: object) -> Exception:
    from imagegen.settings import Settings

    try:
        Settings(**values)  # type: ignore[arg-type]
    except Exception as exc:
        return exc
    raise AssertionError(f"{values} were accepted")


def test_a_configuration_error_names_the_settings_never_their_values() -> None:
    exc = _settings_error(png_encode_threads=0, signed_url_ttl="hunter2-secret")
    error = ConfigurationError.of("render could not start", exc)
    summary, _, named = error.message.partition(": invalid settings: ")
    assert summary == "render could not start"
    assert set(named.split(", ")) == {"png_encode_threads", "signed_url_ttl"}
    assert set(error.fields) == {"png_encode_threads", "signed_url_ttl"}
    assert "hunter2" not in error.message + str(error.errors)
    shown = ConfigurationError.of("", exc, name=lambda field: f"IMAGEGEN_{field.upper()}")
    assert shown.message.startswith("invalid settings: ")
    assert "IMAGEGEN_PNG_ENCODE_THREADS" in shown.message


@pytest.mark.parametrize(
    ("env", "message", "field"),
    [
        (
            {"IMAGEGEN_STORAGE_URL": "s3://imagegen/x", "IMAGEGEN_S3_PRESET": "minio"},
            "persist could not start: the minio preset needs IMAGEGEN_S3_ENDPOINT_URL,"
            " e.g. http://minio.<namespace>.svc:9000",
            "IMAGEGEN_S3_ENDPOINT_URL",
        ),
        (
            {"IMAGEGEN_STORAGE_URL": "azure://b/x"},
            "persist could not start: invalid IMAGEGEN_STORAGE_URL: unsupported scheme 'azure';"
            " use a path, file:// or s3://",
            "IMAGEGEN_STORAGE_URL",
        ),
    ],
    ids=["preset", "scheme"],
)
def test_a_refusal_of_what_reads_the_settings_keeps_its_words_and_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str, field: str
) -> None:
    """A function said ``invalid setting: s3_endpoint_url``: the field, not the variable the
    docs name, and without the hint the CLI shows for the same settings."""
    from imagegen.settings import Settings
    from imagegen.storage import open_storage

    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    try:
        open_storage(Settings())
    except ConfigurationError as exc:
        refused = exc
    else:
        raise AssertionError(f"{env} opened a storage")
    error = ConfigurationError.of("persist could not start", refused, name=Settings.variable)
    assert error.message == message
    assert error.fields == [field]
    # A refusal whose words name no setting names the variables before them.
    bare = ConfigurationError("no words", errors=[{"field": "storage_url", "message": "why"}])
    named = ConfigurationError.of("", bare, name=Settings.variable)
    assert named.message == "invalid settings: IMAGEGEN_STORAGE_URL (no words)"


def test_a_rule_across_settings_is_given_in_its_own_words() -> None:
    exc = _settings_error(model="black-forest-labs/FLUX.1-schnell", served_models=["tiny"])
    error = ConfigurationError.of("enhance could not start", exc)
    assert error.message.startswith("enhance could not start: invalid settings: IMAGEGEN_MODEL")
    assert (
        "(body)" not in error.message and "must be one of IMAGEGEN_SERVED_MODELS" in error.message
    )
    assert error.errors == []  # no field of its own to name


def test_an_error_says_what_it_quotes_in_bounded_space() -> None:
    errors = [{"field": f"f{n}", "message": "x" * 1000} for n in range(25)]
    error = InvalidRequest("y" * 5000, errors=errors)
    assert (
        len(error.message) == 1000 and error.message.endswith("…") and str(error) == error.message
    )
    assert [e["field"] for e in error.errors[:19]] == [f"f{n}" for n in range(19)]
    assert all(len(e["message"]) == 200 for e in error.errors[:19])
    assert error.errors[19] == {"field": "…", "message": "6 more, not listed"}
    small = InvalidRequest("bad", errors=errors[:20])
    assert small.errors == [{"field": f"f{n}", "message": "x" * 199 + "…"} for n in range(20)]
