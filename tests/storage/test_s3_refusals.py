"""Stores that refuse the checksum headers boto3 adds under its defaults (the ``aws`` preset):
what each request becomes, through boto3 and botocore unpatched, against a small store on
loopback that answers as each store is reported to.

* Backblaze B2: ``400 InvalidArgument`` "Unsupported header '<header>' received for this API
  call." for ``x-amz-sdk-checksum-algorithm`` (matrix-org/synapse-s3-storage-provider#128,
  home-assistant/core#143995), ``x-amz-checksum-crc32`` (stonith404/pingvin-share#798) and
  ``x-amz-checksum-mode`` on reads (vatesfr/xen-orchestra#8358); B2 lists them as unsupported
  (https://www.backblaze.com/docs/cloud-storage-s3-compatible-api, "Unsupported Features").
* Cloudflare R2, January 2025: ``501 NotImplemented`` "Header 'x-amz-checksum-crc32' with value
  '<value>' not implemented" (cloudflare/cloudflare-docs#19236), and the same of
  ``x-amz-checksum-mode: ENABLED`` on reads (duolicious/duolicious#612).

Either store otherwise keeps objects and honours ``If-None-Match: *`` (412 on an existing key).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from pydantic import SecretStr

from imagegen.errors import ConfigurationError
from imagegen.storage import GenerationKeys, S3Storage, s3_options
from tests.fakes.loopback import LoopbackServer
from tests.storage.conftest import fast_options

KEYS = GenerationKeys("gen-0005", datetime(2026, 5, 1, tzinfo=UTC))
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 1024
PORTS = range(48200, 48300)


@dataclass(frozen=True)
class Refusal:
    """How a store answers a request carrying one of ``headers`` (the first one present)."""

    status: int
    code: str
    message: str  # formatted with the header's name and value
    headers: tuple[str, ...]


B2 = Refusal(
    400,
    "InvalidArgument",
    "Unsupported header '{name}' received for this API call.",
    ("x-amz-sdk-checksum-algorithm", "x-amz-checksum-crc32", "x-amz-checksum-mode"),
)
R2_JANUARY_2025 = Refusal(
    501,
    "NotImplemented",
    "Header '{name}' with value '{value}' not implemented",
    ("x-amz-checksum-crc32", "x-amz-checksum-mode"),
)


class Store:
    """One bucket's objects, path-style, refusing as ``refusal`` says; every request's headers
    (lower-case) recorded."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self.objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self.server = _bound(_handler(self))
        self.endpoint = self.server.url


def _bound(handler: type[BaseHTTPRequestHandler]) -> LoopbackServer:
    for port in PORTS:
        try:
            return LoopbackServer(handler, port=port, name="checksum-refusing-store")
        except OSError:
            continue
    raise RuntimeError(f"no free port in {PORTS}")


def _handler(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_request(self) -> None:
            self.close_connection = True
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            with store._lock:
                store.requests.append((self.command, headers))
            refused = [name for name in store.refusal.headers if name in headers]
            if refused:
                name = refused[0]
                message = store.refusal.message.format(name=name, value=headers[name])
                self._error(store.refusal.status, store.refusal.code, message)
                return
            _, _, key = self.path.split("?", 1)[0].lstrip("/").partition("/")
            with store._lock:
                found = store.objects.get(key)
                if self.command == "PUT":
                    if found is not None and headers.get("if-none-match") == "*":
                        self._error(412, "PreconditionFailed", "At least one precondition failed")
                        return
                    store.objects[key] = body
            if self.command == "PUT" or not key:  # an upload, or HeadBucket
                self._respond(200, b"")
            elif found is None:
                self._error(404, "NoSuchKey", "The specified key does not exist.")
            else:
                self._respond(200, found)

        do_GET = do_PUT = do_HEAD = do_request

        def _error(self, status: int, code: str, message: str) -> None:
            payload = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            self._respond(status, payload.encode(), content_type="application/xml")

        def _respond(self, status: int, payload: bytes, content_type: str = "") -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("ETag", '"e"')
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture(params=[B2, R2_JANUARY_2025], ids=["b2", "r2-january-2025"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    store = Store(request.param)
    with store.server:
        yield store


def storage_on(store: Store, preset: str) -> S3Storage:
    options = s3_options(
        preset,
        endpoint_url=store.endpoint,
        access_key_id=SecretStr("key-id"),
        secret_access_key=SecretStr("secret"),
    )
    return S3Storage("bucket", options=replace(fast_options(options), max_attempts=3))


Attempt = Callable[[S3Storage], Awaitable[object]]
ATTEMPTS: dict[str, Attempt] = {
    "put": lambda s: s.put(KEYS.image, PNG, content_type="image/png"),
    "create": lambda s: s.create(KEYS.image, PNG, content_type="image/png"),
    "check": lambda s: s.check(),
}


@pytest.mark.parametrize("attempt", list(ATTEMPTS.values()), ids=list(ATTEMPTS))
async def test_a_refused_checksum_header_names_the_preset(store: Store, attempt: Attempt) -> None:
    """Under ``aws`` at another endpoint, B2's 400 was answered as a bug (a 500, never
    retried), R2's 501 as a store without conditional writes (create, check) or as the store
    unavailable (put): each is the preset's doing, and said so."""
    storage = storage_on(store, "aws")

    with pytest.raises(ConfigurationError) as error:
        await attempt(storage)

    assert error.value.retryable and error.value.status == 503
    assert error.value.fields == ["s3_preset"]
    message = error.value.message
    assert f"refused the upload's checksum ({store.refusal.code})" in message
    assert "set IMAGEGEN_S3_PRESET=minio" in message
    assert "conditional writes" not in message
    assert len(store.requests) == 1 + (attempt is ATTEMPTS["check"])  # its HeadBucket first


async def test_a_read_refused_for_its_checksum_mode_names_the_preset(store: Store) -> None:
    """botocore asks for a read's checksum (``x-amz-checksum-mode: ENABLED``) under its
    defaults; B2 and R2 refused that header as they refused the upload's."""
    storage = storage_on(store, "aws")

    with pytest.raises(ConfigurationError) as error:
        await storage.get(KEYS.image)

    assert store.requests[0][1].get("x-amz-checksum-mode") == "ENABLED"
    assert error.value.fields == ["s3_preset"]
    assert f"refused a checksum header ({store.refusal.code})" in error.value.message


async def test_the_store_works_under_the_preset_the_error_names(store: Store) -> None:
    """What the error advises holds: under ``minio`` no checksum header of boto3's is sent,
    and the same store keeps objects and refuses a second create."""
    storage = storage_on(store, "minio")

    await storage.check()
    await storage.put(KEYS.image, PNG, content_type="image/png")
    assert await storage.get(KEYS.image) == PNG
    assert not await storage.create(KEYS.image, PNG, content_type="image/png")
    assert await storage.create(KEYS.metadata, b"{}", content_type="application/json")

    for _, headers in store.requests:
        assert not any(name in headers for name in B2.headers + R2_JANUARY_2025.headers)
