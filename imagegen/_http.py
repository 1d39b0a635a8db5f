"""An httpx transport that sends requests with aiohttp.

Made for the Ollama client: ``ollama.AsyncClient`` speaks httpx, and on enhance's hot path
httpcore's pool costs more CPU than the rest of the request (its anyio stream asks every pooled
connection whether it is readable, with a ``getpeername`` and a ``poll`` each time). aiohttp's
pool and its C parser do the same work for about a third of the CPU (docs/adr/0012). The httpx
client in front stays: base URL, headers, timeouts, proxies from the environment, redirects,
decoding, and the exceptions callers catch.

Errors are raised as the httpx exceptions httpcore raises for the same failure
(``httpcore/_exceptions.py``, ``httpx/_transports/default.py``: ``map_httpcore_exceptions``), so
code written against httpx (and ollama, which turns an ``httpx.ConnectError`` into a
``ConnectionError``) sees no difference: a refused connection is a ``ConnectError``, not a
timeout, and a server that closes the connection before answering is a
``RemoteProtocolError``. (``httpx-aiohttp`` 0.2 maps every ``ClientConnectionError``, a refused
connection included, to ``ConnectTimeout``, which is why it is not used.)

A body can be capped (``max_body``): httpx reads a whole non-streamed body into memory, so a
server that answers with hundreds of megabytes would take the process with it. A body longer
than the cap, whether its ``Content-Length`` says so (nothing of it is read) or it is chunked
(read up to the cap), raises :class:`BodyTooLarge` and closes the connection. The cap holds on
the body as sent and once decompressed: a few hundred compressed kilobytes can decompress to
gigabytes, which httpx, decoding a whole body before anyone can count it, would hold at once. So
a capped transport decompresses gzip and deflate itself, a chunk at a time and never more than
one byte past the cap, and hands httpx the decoded body without its ``Content-Encoding``; any
other coding (br, zstd, one stacked on another) it cannot bound, and refuses.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport", "BodyTooLarge"]

# (aiohttp's exception, httpx's) from the most specific; the first match wins.
# aiohttp/client_exceptions.py: both timeouts below derive from ServerTimeoutError, which is a
# ClientConnectionError and an asyncio.TimeoutError.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),  # ClientTimeout.sock_connect/connect
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # sock_read (SocketTimeoutError)
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS handshake
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),  # closed before a reply
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # a body cut short or malformed
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # a status line it cannot parse
    (aiohttp.ClientOSError, httpx.ReadError),  # reset by peer, broken pipe
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.ReadTimeout),
)


class BodyTooLarge(httpx.RemoteProtocolError):
    """A response body longer than the transport's cap; raised as httpcore raises a header
    past h11's limit, a protocol error of the peer's."""


@contextmanager
def _mapped(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        ours = next(ours for theirs, ours in _ERRORS if isinstance(exc, theirs))  # ends with both
        raise ours(str(exc) or type(exc).__name__, request=request) from exc


def _codings(response: aiohttp.ClientResponse) -> list[str]:
    """The body's content codings, in the order they were applied, ``identity`` left out."""
    return [
        coding
        for value in response.headers.getall("Content-Encoding", ())
        for coding in (part.strip().lower() for part in value.split(","))
        if coding not in ("", "identity")
    ]


class _Decoder:
    """Decompresses one gzip or deflate body, never more than asked for at a time.

    As httpx decodes them (``httpx/_decoders.py``): ``gzip`` and ``x-gzip`` as one gzip member,
    ``deflate`` as a zlib stream or, where its first bytes are no zlib header, as raw deflate
    (servers send both under that name).
    """

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._first = not self._gzip  # deflate: zlib or raw, told by the first bytes
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS)

    @property
    def done(self) -> bool:
        """Whether the compressed stream came to its end."""
        return self._zlib.eof

    def decompress(self, data: bytes, most: int) -> bytes:
        """``data`` decompressed, at most ``most`` bytes of it (``most`` > 0). Less than
        ``most`` means all of ``data`` was decoded (zlib keeps the rest in ``unconsumed_tail``
        only when the output is full), so asking for one byte past the cap tells a body over it.

        Raises:
            zlib.error: ``data`` is no such stream.
        """
        first, self._first = self._first, False
        try:
            return self._zlib.decompress(data, most)
        except zlib.error:
            if not first:
                raise
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._zlib.decompress(data, most)


# What a capped transport decodes itself; httpx's other decoders (br, zstd, where their
# packages are installed) decode a whole body with no bound.
_BOUNDED = frozenset({"gzip", "x-gzip", "deflate"})


class _Body(httpx.AsyncByteStream):
    """A response body read from aiohttp as it arrives; closing it frees the connection.

    With a cap, a body sent in ``codings`` is decompressed here, where it is one coding the
    transport can bound, or refused; the cap counts both the bytes as sent and those decoded.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        request: httpx.Request,
        limit: int | None,
        codings: list[str],
    ) -> None:
        self._response = response
        self._request = request
        self._limit = limit
        self._codings = codings

    def _too_large(self, size: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"response body of {size} is over the {self._limit} bytes allowed",
            request=self._request,
        )

    def _undecodable(self, why: str) -> httpx.DecodingError:
        return httpx.DecodingError(why, request=self._request)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        limit = self._limit
        declared = self._response.content_length
        if limit is not None and declared is not None and declared > limit:
            raise self._too_large(f"{declared} bytes")  # unread: aclose closes the connection
        decoder: _Decoder | None = None
        refused = ""  # a coding it cannot bound: refused once there is a body (not for HEAD)
        if limit is not None and self._codings:
            if len(self._codings) == 1 and self._codings[0] in _BOUNDED:
                decoder = _Decoder(self._codings[0])
            else:
                refused = ", ".join(self._codings)[:64]
        read = decoded = 0
        with _mapped(self._request):
            async for chunk in self._response.content.iter_any():
                if refused:
                    raise self._undecodable(f"Content-Encoding {refused} not supported")
                read += len(chunk)
                if limit is not None and read > limit:
                    raise self._too_large(f"more than {limit} bytes")
                if decoder is not None and limit is not None:
                    try:
                        # One byte past the cap at most: enough to know the body is over it.
                        chunk = decoder.decompress(chunk, limit - decoded + 1)
                    except zlib.error as exc:
                        raise self._undecodable(f"{self._codings[0]}: {exc}") from None
                    decoded += len(chunk)
                    if decoded > limit:
                        raise self._too_large(f"more than {limit} bytes once decompressed")
                if chunk:
                    yield chunk
        if decoder is not None and read and not decoder.done:
            raise self._undecodable(f"{self._codings[0]} body cut short")

    async def aclose(self) -> None:
        self._response.release()  # back to the pool if read to its end, else closed


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends an httpx client's requests through one aiohttp session per event loop.

    Connections belong to the loop that opened them. Used from a new loop (a second
    ``asyncio.run``), the transport opens a new session there and leaves the old loop's
    connections to be closed when collected, as httpx's own transport cannot reuse them either.

    Args:
        limits: The pool's size (``max_connections``) and how long an idle connection is kept
            (``keepalive_expiry``), as an httpx transport reads them.
        verify: The TLS context for ``https`` URLs; default httpx's (certifi's roots, or
            ``SSL_CERT_FILE``/``SSL_CERT_DIR``), made on the first ``https`` request.
        max_body: The most bytes of a response body read, as sent and once decompressed; a
            longer one raises :class:`BodyTooLarge`. A gzip or deflate body is then decoded
            here and reaches httpx without its ``Content-Encoding`` and ``Content-Length``
            (``aiter_raw`` too yields it decoded); any other coding raises
            :class:`httpx.DecodingError`. None: no cap, and httpx decodes the body.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits | None = None,
        verify: ssl.SSLContext | None = None,
        max_body: int | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, keepalive_expiry=5.0)
        self._limit = limits.max_connections or 0  # aiohttp: 0 is no limit
        self._keepalive = limits.keepalive_expiry
        self._verify = verify
        self._max_body = max_body
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def tls_context(self) -> ssl.SSLContext:
        """The context ``https`` requests are verified with; made now if not yet (loading the
        CA bundle takes tens of milliseconds: a warm-up can call this ahead of the first)."""
        if self._verify is None:
            self._verify = httpx.create_ssl_context()
        return self._verify

    def _current(self) -> aiohttp.ClientSession:
        """The session of the running loop: a connection cannot move between loops."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                keepalive_timeout=self._keepalive,
                # Hosts are resolved as httpcore resolves them: by the system, no cache here.
                use_dns_cache=False,
            )
            # httpx does what a session would otherwise do on top: cookies, proxies from the
            # environment, redirects and decompression.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._loop = loop
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        options: dict[str, Any] = {}
        if request.url.scheme == "https":
            options["ssl"] = self.tls_context()
            if sni := request.extensions.get("sni_hostname"):
                options["server_hostname"] = sni
        url = request.url
        if url.userinfo:
            # httpx has made the URL's credentials the Authorization header
            # (httpx/_client.py: _build_request_auth); aiohttp refuses both at once. (A URL
            # given to a plain client, such as remote_context's endpoint: the Ollama client's
            # base URL never has user-info, and sends the host's as its own ``auth``.)
            url = url.copy_with(userinfo=b"")
        with _mapped(request):
            response = await self._current().request(
                request.method,
                URL(str(url), encoded=True),  # as httpx quoted it, not again
                headers=request.headers.multi_items(),
                data=await request.aread() or None,
                allow_redirects=False,  # httpx follows them, as the client says
                compress=None,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeout.get("pool"),  # waiting for a pooled connection, as httpcore
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
                **options,
            )
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("ascii", "replace")
        headers = list(response.raw_headers)
        codings = _codings(response) if self._max_body is not None else []
        if codings:
            # Decoded here, so not again by httpx; and the length sent is not the length handed
            # over. Go's transport does the same where it decompresses a body itself
            # (net/http/transport.go, persistConn.readLoop: Header.Del both, ContentLength -1).
            dropped = (b"content-encoding", b"content-length")
            headers = [(name, value) for name, value in headers if name.lower() not in dropped]
        return httpx.Response(
            response.status,
            headers=headers,
            stream=_Body(response, request, self._max_body, codings),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()
