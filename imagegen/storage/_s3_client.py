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
from botocore.utils import S3RegionRedirectorv2

from imagegen.storage.presets import S3Options, _on_aws

__all__ = ["CONNECTIONS", "make_client"]

CONNECTIONS = 32
"""Connections each client keeps open to its endpoint (botocore's ``max_pool_connections``; its
default is 10): one for each thread S3 storage's calls run on
(:data:`~imagegen.storage.s3.MAX_THREADS`), so no call waits for one."""


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
        # Within botocore's retry quota: see S3Options.max_attempts.
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        max_pool_connections=CONNECTIONS,
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
    if not _on_aws(options.endpoint_url):
        _without_region_redirects(client)
    if options.create_if_absent == "gcs-generation-match":
        client.meta.events.register("before-call.s3.PutObject", _gcs_create_if_absent)
    return client


# Where botocore's region redirector listens (botocore/utils.py, S3RegionRedirectorv2.register).
_REDIRECTOR_EVENTS = (
    "needs-retry.s3",
    "before-parameter-build.s3",
    "before-endpoint-resolution.s3",
)


def _without_region_redirects(client: Any) -> None:
    """Take botocore's region redirector off ``client``, whose endpoint is not AWS's.

    botocore gives every S3 client one (botocore/client.py, ``ClientCreator._register_s3_events``:
    ``S3RegionRedirectorv2(None, client).register()``). On a 301, 302 or 307 whose answer names
    no region (an ``x-amz-bucket-region`` header, a ``Region`` in the error) it asks HeadBucket,
    on the same client, for one (botocore/utils.py, ``S3RegionRedirectorv2.get_bucket_region``).
    AWS answers HeadBucket with that header, redirect or not (API_HeadBucket.html); a proxy in
    front of another store (an ingress sending ``http://`` on to ``https://``) answers its own
    redirect again, and each HeadBucket asks another until Python's recursion limit. Such a
    redirect is the settings' to fix: without the redirector it reaches the storage as the 3xx
    it is, and is said so (:meth:`~imagegen.storage.s3.S3Storage._client_error`).

    botocore's event emitter lists no handlers publicly: its handler store is read to find the
    redirector's, which are then taken off through its public ``unregister``. An emitter of
    another shape fails here, as the client is made, not at the first redirect.
    """
    events = client.meta.events
    handlers = events._emitter._handlers  # botocore/hooks.py: HierarchicalEmitter's _PrefixTrie
    for event in _REDIRECTOR_EVENTS:
        for handler in handlers.prefix_search(event):
            if isinstance(getattr(handler, "__self__", None), S3RegionRedirectorv2):
                events.unregister(event, handler)


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
