"""JSON log lines: trace correlation, no secrets ever, prompts only when allowed."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from imagegen.models import GenerationRequest
from imagegen.observability import JsonFormatter, setup_logging
from imagegen.service import ImageGenService
from imagegen.settings import Settings
from imagegen.telemetry import tracer
from tests.observability.conftest import InMemoryTelemetry

SECRET = 'sk-"very\\secret"-4f2a'  # quote and backslash: JSON escapes them
KEY_SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY"


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_line_carries_time_level_stage_generation_and_trace_ids(
    otel: InMemoryTelemetry, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(Settings(), "render")
    with tracer().start_as_current_span("imagegen.render") as stage:
        stage.set_attribute("imagegen.generation_id", "gen-42")
        with tracer().start_as_current_span("imagegen.storage.put") as child:
            logging.getLogger("imagegen.test").info("stored %s", "it", extra={"size": 3})
            context = child.get_span_context()
    [entry] = lines(capsys.readouterr().err)
    assert entry["message"] == "stored it"
    assert entry["level"] == "INFO"
    assert entry["time"].endswith("+00:00")
    assert entry["logger"] == "imagegen.test"
    assert entry["stage"] == "render"
    assert entry["generation_id"] == "gen-42"  # inherited from the stage span
    assert entry["trace_id"] == f"{context.trace_id:032x}"
    assert entry["span_id"] == f"{context.span_id:016x}"
    assert entry["size"] == 3


def test_secrets_never_appear_in_a_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(
        url_signing_secret=SecretStr(SECRET), s3_secret_access_key=SecretStr(KEY_SECRET)
    )
    setup_logging(settings, "persist")
    log = logging.getLogger("imagegen.test")
    log.warning("signing with %s", settings.url_signing_secret)
    log.warning("raw value %s and %s", SECRET, KEY_SECRET)
    log.warning("as extras", extra={"secret": settings.s3_secret_access_key, "raw": KEY_SECRET})
    try:
        raise RuntimeError(f"bad key {KEY_SECRET} / {SECRET}")
    except RuntimeError:
        log.exception("failed")
    err = capsys.readouterr().err
    entries = lines(err)
    assert len(entries) == 4
    escaped = json.dumps(SECRET)[1:-1]
    for secret in (SECRET, escaped, KEY_SECRET, "very\\\\secret", "MDENG"):
        assert secret not in err
    assert entries[0]["message"] == "signing with **********"
    assert entries[1]["message"] == "raw value *** and ***"
    assert entries[2]["secret"] == "**********"
    assert "***" in entries[3]["exception"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_are_logged_only_when_allowed(
    log_prompts: bool, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = "a portrait of my neighbour Ingrid in her garden"
    settings = Settings(ollama_retries=0, log_prompts=log_prompts, model="tiny")
    formatter = JsonFormatter("enhance", log_prompts=log_prompts)

    async def enhance() -> None:
        async with ImageGenService(settings) as service:
            await service.enhance(GenerationRequest(prompt=prompt, width=256, height=256))

    with caplog.at_level(logging.INFO):
        asyncio.run(enhance())
        logging.getLogger("imagegen.test").info("job", extra={"prompt": prompt})
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert ("Ingrid" in text) is log_prompts


def test_http_client_request_lines_never_reach_the_logs() -> None:
    # httpx logs each request at INFO with its full URL, credentials and query tokens included.
    from imagegen._logging import setup_logging
    from imagegen.settings import Settings

    setup_logging(Settings(log_level="DEBUG"))
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    assert not logging.getLogger("httpcore").isEnabledFor(logging.INFO)


@pytest.fixture
def library_warnings() -> Iterator[None]:
    """The model libraries at their default verbosity, warnings on, for this test: each reads
    its verbosity once, when first imported, and an in-process run of the command line
    earlier in this process (TRANSFORMERS_VERBOSITY=error, warnings ignored) may have set it."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    levels = [library.get_verbosity() for library in libraries]
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for library in libraries:
            library.set_verbosity_warning()
        try:
            yield
        finally:
            for library, level in zip(libraries, levels, strict=True):
                library.set_verbosity(level)


@pytest.mark.usefixtures("library_warnings")
def test_model_library_warnings_are_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib
    import warnings

    # Imported as render imports it: before the model libraries.
    importlib.import_module("imagegen.render._loading")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Undo an earlier test's capture, which pytest's own warning recorder has replaced since.
    logging.captureWarnings(False)
    try:
        setup_logging(Settings(), "render")
        transformers_logging.get_logger("transformers.models.t5").warning("legacy tokenizer")
        diffusers_logging.get_logger("diffusers.pipelines").warning("dtype is deprecated")
        warnings.warn("torch_dtype is deprecated", FutureWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    entries = lines(capsys.readouterr().err)  # every line parses as JSON
    assert {e["message"] for e in entries if e["logger"].startswith(("transformers", "diff"))} == {
        "legacy tokenizer",
        "dtype is deprecated",
    }
    [warning] = [e for e in entries if e["logger"] == "py.warnings"]
    assert "torch_dtype is deprecated" in warning["message"]
    assert all(e["stage"] == "render" for e in entries)


@pytest.mark.parametrize("log_prompts", [False, True])
@pytest.mark.usefixtures("library_warnings")
def test_the_part_of_a_prompt_a_text_encoder_cut_is_logged_only_when_allowed(
    log_prompts: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # diffusers' FLUX pipeline warns with the words past CLIP's 77 tokens and past T5's
    # max_sequence_length: most prompts an LLM writes are longer than that.
    from datetime import UTC, datetime

    from imagegen.models import EnhancedPrompt

    settings = Settings(
        model="tiny", device="cpu", storage_url=str(tmp_path), log_prompts=log_prompts
    )
    prompt = " ".join(["lantern"] * 300) + " at Ingrid's house, 12 Elm Street"
    job = EnhancedPrompt(
        generation_id=f"cut-{log_prompts}",
        prompt=prompt,
        enhancer="passthrough",
        model="tiny",
        width=256,
        height=256,
        steps=1,
        guidance=3.5,
        seed=1,
        requested_at=datetime.now(UTC),
    )

    async def render() -> None:
        async with ImageGenService(settings) as service:
            await service.render(job)

    logging.captureWarnings(False)
    try:
        setup_logging(settings, "render")
        asyncio.run(render())
    finally:
        logging.captureWarnings(False)
    cut = [e for e in lines(capsys.readouterr().err) if "input was truncated" in e["message"]]
    assert len(cut) == 2  # CLIP's and T5's
    text = json.dumps(cut)
    assert ("Elm Street" in text) is log_prompts
    assert ("withheld" in text) is not log_prompts


def test_a_line_is_json_whatever_its_values_and_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(
        hf_token=SecretStr("503"),  # a secret that is also a number said in a line
        webhook_secrets=[SecretStr("whsec_" + "A" * 32)],
        s3_secret_access_key=SecretStr("it's a \\secret"),
    )
    setup_logging(settings, "persist")
    log = logging.getLogger("imagegen.test")
    log.warning("status %s", 503, extra={"ratio": float("nan"), "by": {(1, 2): "x"}})
    log.warning("key %r", "it's a \\secret")
    log.warning("webhook whsec_%s", "A" * 32)
    err = capsys.readouterr().err

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is no JSON")

    entries = [json.loads(line, parse_constant=strict) for line in err.splitlines()]
    assert entries[0]["message"] == "status ***"
    assert entries[0]["ratio"] == "nan" and entries[0]["by"] == {"(1, 2)": "x"}
    assert entries[1]["message"] == 'key "***"'  # its repr, quoted with " as it holds a '
    assert "secret" not in err
    assert entries[2]["message"] == "webhook ***"


async def test_an_s3_request_at_debug_logs_no_signature(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """botocore logs each request's headers at DEBUG, its SigV4 ``Authorization`` (a signature
    anyone can replay for minutes) among them; the dev profile logs at DEBUG."""
    from imagegen.storage import open_storage
    from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with S3Server() as s3:
        s3.create_bucket("debugged")
        settings = Settings(
            storage_url="s3://debugged/images",
            s3_endpoint_url=s3.endpoint,
            s3_preset="minio",
            s3_access_key_id=SecretStr(ACCESS_KEY_ID),
            s3_secret_access_key=SecretStr(SECRET_ACCESS_KEY),
            log_level="DEBUG",
        )
        setup_logging(settings, "persist")
        storage = open_storage(settings)
        await storage.put("2026/01/01/g.png", b"png", content_type="image/png")
        assert await storage.get("2026/01/01/g.png") == b"png"
        # Not under imagegen: the command line's tests set that logger's level in this process.
        logging.getLogger("tests.s3-debug").debug("stored")
    err = capsys.readouterr().err
    assert any(e["message"] == "stored" for e in lines(err))  # DEBUG is on
    assert "Signature=" not in err and "AWS4-HMAC-SHA256 Credential" not in err
