"""The boto3 client of an :class:`~imagegen.storage.s3.S3Storage`, made from its options.

One boto3 session of our own (not boto3's default one, which other code may configure), used
under a lock because sessions are not thread-safe; the clients it makes are, and are shared by
the storage's worker threads.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config

from imagegen.storage.presets import S3Options

__all__ = ["make_client"]


def make_client(options: S3Options) -> Any:
    """A client for ``options``, traced with OpenTelemetry when it is installed."""
    _instrument_botocore()
    extra: dict[str, Any] = {}
    if options.checksums is not None:
        extra["request_checksum_calculation"] = options.checksums
        extra["response_checksum_validation"] = options.checksums
    config = Config(
        region_name=options.region,
        signature_version="s3v4",
        s3={"addressing_style": options.addressing_style},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        # Enough for the default thread pool of asyncio.to_thread.
        max_pool_connections=32,
        user_agent_appid="imagegen",
        **extra,
    )
    credentials: dict[str, str] = {}
    if options.access_key_id is not None and options.secret_access_key is not None:
        credentials = {
            "aws_access_key_id": options.access_key_id.get_secret_value(),
            "aws_secret_access_key": options.secret_access_key.get_secret_value(),
        }
    global _session
    client: Any
    # The session's model cache is reused by every client.
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        client = _session.client(
            "s3", endpoint_url=options.endpoint_url, config=config, **credentials
        )
    if options.create_if_absent == "gcs-generation-match":
        client.meta.events.register("before-call.s3.PutObject", _gcs_create_if_absent)
    return client


def _gcs_create_if_absent(params: dict[str, Any], **_: Any) -> None:
    """Say ``If-None-Match: *`` on an upload the way GCS's XML API understands it.

    Runs before signing, so the header is signed like any other. Generation 0 matches only
    when there is no live object (https://cloud.google.com/storage/docs/request-preconditions).
    """
    headers = params["headers"]
    if headers.get("If-None-Match") == "*":
        del headers["If-None-Match"]
        headers["x-goog-if-generation-match"] = "0"


_session_lock = threading.Lock()
_session: Any = None


_instrument_lock = threading.Lock()
_instrumented = False


def _instrument_botocore() -> None:
    """Trace botocore calls with OpenTelemetry, once per process (a no-op without an SDK)."""
    global _instrumented
    with _instrument_lock:
        if _instrumented:
            return
        _instrumented = True
        try:
            from opentelemetry.instrumentation.botocore import BotocoreInstrumentor
        except ImportError:
            return
        instrumentor = BotocoreInstrumentor()  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
