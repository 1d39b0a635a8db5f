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
(read up to the cap), raises :class:`BodyTooLarge` and closes the connection.
"""

from __future__ import annotations

import asyncio
import ssl
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


class _Body(httpx.AsyncByteStream):
    """A response body read from aiohttp as it arrives; closing it frees the connection."""

    def __init__(
        self, response: aiohttp.ClientResponse, request: httpx.Request, limit: int | None
    ) -> None:
        self._response = response
        self._request = request
        self._limit = limit

    def _too_large(self, size: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"response body of {size} is over the {self._limit} bytes allowed",
            request=self._request,
        )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        limit = self._limit
        declared = self._response.content_length
        if limit is not None and declared is not None and declared > limit:
            raise self._too_large(f"{declared} bytes")  # unread: aclose closes the connection
        read = 0
        with _mapped(self._request):
            async for chunk in self._response.content.iter_any():
                read += len(chunk)
                if limit is not None and read > limit:
                    raise self._too_large(f"more than {limit} bytes")
                yield chunk

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
        max_body: The most bytes of a response body read, as sent (before httpx decodes
            it); a longer one raises :class:`BodyTooLarge`. None: no cap.
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
            # (httpx/_client.py: _build_request_auth); aiohttp refuses both at once.
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
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request, self._max_body),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()
