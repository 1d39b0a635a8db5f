"""A real S3 HTTP server on loopback: moto, behind a small recording reverse proxy.

Clients talk to :attr:`S3Server.endpoint` (the proxy). The proxy records every request as it
arrived (method, path, headers) and forwards it unchanged to moto, so tests can assert on what
an S3 client really sent. It can also play an outage::

    with S3Server() as s3:
        s3.create_bucket("images")
        ...                                  # talk to s3.endpoint
        s3.down()                            # connections refused
        s3.down(status=503)                  # every request answered 503 SlowDown
        s3.down(status=503, count=1)         # only the next request
        s3.down(hang=True)                   # requests accepted, never answered
        s3.up()                              # back to normal

It can answer user metadata the way Google Cloud Storage does, as ``x-goog-meta-*`` headers::

    s3.gcs_metadata = True

It can refuse the credentials in use as AWS does, wholly or the bucket's listing only::

    s3.denied = "credentials"                # an unknown access key: 403 InvalidAccessKeyId
    s3.denied = "listing"                    # no s3:ListBucket: HeadBucket, ListObjects and a
                                             # missing key's GET or HEAD are 403 AccessDenied

(docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html: HeadBucket needs s3:ListBucket;
API_GetObject.html and API_HeadObject.html: without it, a key that does not exist is a 403
AccessDenied, not a 404; a HEAD's error has no body, only its status.)

It can ignore the upload precondition as some stores do, taking it and overwriting the object::

    s3.ignores_conditions = True             # If-None-Match and x-goog-if-generation-match
                                             # dropped from every PUT before moto sees it

(MinIO before RELEASE.2024-05-07T06-41-25Z compares ``If-None-Match: *`` with the object's ETag
and overwrites, minio/minio#19682; GCS's XML API applies ``If-None-Match`` to reads only,
https://cloud.google.com/storage/docs/request-preconditions, so under a preset other than
``gcs`` its uploads overwrite too.)

It can answer every request with a redirect elsewhere, as a proxy in front of a store may (an
ingress sending ``http://`` on to ``https://``): a ``301 Moved Permanently`` with a
``Location`` and an HTML body, nginx's own::

    s3.redirect = "https://store.example"    # Location: https://store.example<path>

It can hold uploads back until several have arrived, so that writers race for certain::

    s3.gate(".png", 2)                       # the first PUT of a *.png waits for a second

Conditional uploads: moto (``moto/s3/responses.py``, ``put_object``) honours ``If-None-Match: *``
but checks for the key and writes it in two steps without a lock, where S3 decides atomically;
the proxy therefore forwards conditional uploads one at a time. It also understands GCS's
upload precondition ``x-goog-if-generation-match: 0`` ("no live object", answered 412 when there
is one: https://cloud.google.com/storage/docs/request-preconditions) by forwarding it to moto as
``If-None-Match: *``.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal, Self

import boto3
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from tests.fakes.loopback import LoopbackServer, Running

__all__ = ["RecordedRequest", "S3Server"]

# Not forwarded: they describe this hop, not the request. Expect is answered by the proxy.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "upgrade", "te"}
# Written by the proxy itself when answering.
_SET_HERE = {"transfer-encoding", "content-length", "date", "server"}
# Error codes S3 answers with, by status, for simulated failures.
_ERROR_CODES = {
    400: "InvalidArgument",
    403: "AccessDenied",
    409: "ConditionalRequestConflict",
    500: "InternalError",
    503: "SlowDown",
}
# What nginx answers with its redirect (ngx_http_special_response.c).
_MOVED = (
    b"<html>\r\n<head><title>301 Moved Permanently</title></head>\r\n<body>\r\n"
    b"<center><h1>301 Moved Permanently</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
ACCESS_KEY_ID = "test-access-key-id"
SECRET_ACCESS_KEY = "test-secret-access-key"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it reached the server; header names are lowercase."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class S3Server(Running):
    """moto's S3 behind a recording proxy, both on 127.0.0.1 with free ports."""

    def __init__(self, *, region: str = "us-east-1", gcs_metadata: bool = False) -> None:
        self.region = region
        # Answer x-amz-meta-* response headers as x-goog-meta-*, as GCS does (settable any time).
        self.gcs_metadata = gcs_metadata
        # What the credentials in use are refused (see the module's docstring); settable any time.
        self.denied: Literal["credentials", "listing"] | None = None
        # Drop the upload preconditions (see the module's docstring); settable any time.
        self.ignores_conditions = False
        # Answer every request with a redirect to this origin (see the module's docstring).
        self.redirect: str | None = None
        self._moto: ThreadedMotoServer | None = None
        self._proxy: LoopbackServer | None = None
        self._port = 0
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._fail_status: int | None = None
        self._fail_count: int | None = None
        self._fail_code: str | None = None
        self._hang = threading.Event()
        self._conditional = threading.Lock()
        self._gate: tuple[str, threading.Barrier] | None = None
        self._released = threading.Event()
        self._client: Any = None

    # Lifecycle

    def start(self) -> Self:
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        self._start_proxy()
        return self

    def stop(self) -> None:
        self._released.set()
        self._stop_proxy()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    @property
    def endpoint(self) -> str:
        """The URL clients use (the recording proxy)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def moto_endpoint(self) -> str:
        """moto itself, bypassing the proxy: nothing recorded, no outage."""
        assert self._moto is not None, "start() first"
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    # What the server saw

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received since the last :meth:`clear`, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    # Outages

    def down(
        self,
        *,
        status: int | None = None,
        count: int | None = None,
        hang: bool = False,
        code: str | None = None,
    ) -> None:
        """Make the store unavailable until :meth:`up`.

        Args:
            status: Answer requests with this status instead of refusing connections, with
                the S3 error code of :data:`_ERROR_CODES` (503: ``SlowDown``).
            count: With ``status``: only that many requests fail, then the store is back.
            code: With ``status``: the S3 error code to answer, instead of the status's
                usual one (``OperationAborted`` with 409, ``AuthorizationHeaderMalformed``
                with 400, as ErrorResponses.html lists them).
            hang: Accept requests but never answer them (until ``up``), to exercise timeouts.
        """
        self.up()
        if hang:
            self._released.clear()
            self._hang.set()
        elif status is not None:
            with self._lock:
                self._fail_status, self._fail_count, self._fail_code = status, count, code
        else:
            self._stop_proxy()

    def up(self) -> None:
        """End any outage, any refusal of the credentials (:attr:`denied`), and any ignoring
        of the upload preconditions (:attr:`ignores_conditions`), and any redirect
        (:attr:`redirect`)."""
        self.denied = None
        self.ignores_conditions = False
        self.redirect = None
        with self._lock:
            self._fail_status, self._fail_count, self._fail_code = None, None, None
        self._hang.clear()
        self._released.set()
        if self._proxy is None and self._moto is not None:
            self._start_proxy()

    @contextmanager
    def outage(self, **kwargs: Any) -> Iterator[None]:
        """:meth:`down` for the duration of a ``with`` block."""
        self.down(**kwargs)
        try:
            yield
        finally:
            self.up()

    def gate(self, suffix: str, parties: int, *, timeout: float = 60.0) -> None:
        """Hold PUTs of keys ending in ``suffix`` until ``parties`` of them have arrived."""
        self._gate = (suffix, threading.Barrier(parties, timeout=timeout))

    def _wait_at_gate(self, method: str, path: str) -> None:
        gate = self._gate
        if gate is not None and method == "PUT" and path.split("?")[0].endswith(gate[0]):
            # Not enough writers came: let this one through; the test will say so.
            with contextlib.suppress(threading.BrokenBarrierError):
                gate[1].wait()

    # Set-up shortcuts, straight to moto

    def client(self) -> Any:
        """A boto3 S3 client talking to moto directly (made once; clients are thread-safe)."""
        if self._client is None:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.moto_endpoint,
                region_name=self.region,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
            )
        return self._client

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # Internals

    def _has_bucket(self, name: str) -> bool:
        try:
            self.client().head_bucket(Bucket=name)
        except ClientError:
            return False
        return True

    def _start_proxy(self) -> None:
        self._proxy = LoopbackServer(_handler(self), port=self._port, name="s3-proxy").start()
        self._port = self._proxy.port

    def _stop_proxy(self) -> None:
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.stop()

    def _record(self, request: RecordedRequest) -> tuple[int, str] | None:
        """Keep ``request``; return the status and S3 code to fail it with, if any."""
        with self._lock:
            self._requests.append(request)
            status, code = self._fail_status, self._fail_code
            if status is not None and self._fail_count is not None:
                self._fail_count -= 1
                if self._fail_count <= 0:
                    self._fail_status = self._fail_count = self._fail_code = None
            if status is None:
                return None
            return status, code or _ERROR_CODES.get(status, "ServiceUnavailable")


def _rename_meta(name: str) -> str:
    if name.lower().startswith("x-amz-meta-"):
        return "x-goog-meta-" + name[len("x-amz-meta-") :]
    return name


def _bucket_of(path: str) -> str | None:
    """The bucket of a path-style request for an object; None for one on a bucket itself."""
    bucket, _, key = path.split("?", 1)[0].lstrip("/").partition("/")
    return bucket if key else None


def _handler(server: S3Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 so that "Expect: 100-continue" is answered; one request per connection
        # keeps outages simple (no kept-alive connection outlives a stopped proxy).
        protocol_version = "HTTP/1.1"

        def do_request(self) -> None:
            self.close_connection = True
            body = self._read_body()
            headers = {name.lower(): value for name, value in self.headers.items()}
            failure = server._record(RecordedRequest(self.command, self.path, headers, body))
            if server._hang.is_set():
                server._released.wait(timeout=60)
                return
            server._wait_at_gate(self.command, self.path)
            if failure is not None:
                self._error(*failure)
                return
            if server.redirect is not None:
                location = ("Location", server.redirect + self.path)
                self._respond(301, [location, ("Content-Type", "text/html")], _MOVED)
                return
            if server.denied == "credentials":
                self._error(403, "InvalidAccessKeyId")
                return
            listing = self.command in ("GET", "HEAD") and _bucket_of(self.path) is None
            if server.denied == "listing" and listing:  # HeadBucket, ListObjects(V2)
                self._error(403, "AccessDenied")
                return
            self._forward(body)

        def _error(self, status: int, code: str) -> None:
            payload = f"<Error><Code>{code}</Code><Message>simulated</Message></Error>"
            self._respond(status, [("Content-Type", "application/xml")], payload.encode())

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_request

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                # Forwarded as received: keep the raw chunked framing, trailers included.
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return bytes(raw)
                    raw += self.rfile.read(size + 2)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _forward(self, body: bytes) -> None:
            if server.ignores_conditions and self.command == "PUT":
                # Taken and ignored: the object is written over, answered 200 as any upload.
                del self.headers["If-None-Match"]
                del self.headers["x-goog-if-generation-match"]
            headers = {name.lower(): value for name, value in self.headers.items()}
            if headers.get("x-goog-if-generation-match") == "0":
                del self.headers["x-goog-if-generation-match"]
                self.headers["If-None-Match"] = "*"
            elif "x-goog-if-generation-match" in headers:
                self._respond(501, [], b"only generation 0 is modelled")
                return
            if self.command == "PUT" and self.headers.get("If-None-Match") == "*":
                with server._conditional:
                    self._forward_now(body)
            else:
                self._forward_now(body)

        def _forward_now(self, body: bytes) -> None:
            assert server._moto is not None
            host, port = server._moto.get_host_and_port()
            upstream = http.client.HTTPConnection(host, port, timeout=30)
            try:
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        upstream.putheader(name, value)
                upstream.endheaders(body or None)
                response = upstream.getresponse()
                payload = response.read()
                headers = [
                    (_rename_meta(name) if server.gcs_metadata else name, value)
                    for name, value in response.getheaders()
                    if name.lower() not in _HOP_BY_HOP | _SET_HERE
                ]
            except (OSError, http.client.HTTPException):
                self._respond(502, [], b"")
                return
            finally:
                upstream.close()
            bucket = _bucket_of(self.path)
            missing = response.status == 404 and bucket is not None and server._has_bucket(bucket)
            if server.denied == "listing" and missing:  # not to be told without the permission
                self._error(403, "AccessDenied")
                return
            # A HEAD answer's Content-Length is the object's size, not this (empty) body's.
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self._respond(response.status, headers, payload, length=length)

        def _respond(
            self,
            status: int,
            headers: list[tuple[str, str]],
            payload: bytes,
            *,
            length: str | None = None,
        ) -> None:
            try:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", length or str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            except OSError:
                pass  # the client gave up (e.g. its read timeout); nothing to tell it

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
