"""The aiohttp transport behind the Ollama client, against real servers on loopback.

Each failure must reach the caller as the httpx exception httpcore raises for it, since the
enhancer's retries and its fallback reasons read them (imagegen/enhance/llm.py).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
import threading
import tracemalloc
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import ollama
import pytest

from imagegen._http import AiohttpTransport, BodyTooLarge
from tests.fakes.loopback import LoopbackServer
from tests.fakes.tls import self_signed


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# A small cap, and bodies to send in a content coding under it and over it.
CAP = 64 * 1024
PLAIN = b'{"reply": "' + b"a fox in the snow " * 1000 + b'"}'  # 18 KB, under the cap
BOMB = 4 * 1024 * 1024  # zeros, sent as about 4 KB of gzip
_CODED = {
    "gzip": gzip.compress(PLAIN),
    "zlib": zlib.compress(PLAIN),
    "raw": _raw_deflate(PLAIN),
    "cut": gzip.compress(PLAIN),
    "bomb": gzip.compress(bytes(BOMB)),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps connections open, as Ollama's Go server does
    disable_nagle_algorithm = True
    peers: list[int]
    released: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(
        self, status: int, body: bytes, *headers: tuple[str, str], chunked: bool = False
    ) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if not chunked:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 1024):  # as Go's net/http sends a long body
            piece = body[start : start + 1024]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self) -> None:
        self.peers.append(self.client_address[1])
        if self.path == "/gzip":
            body = gzip.compress(b"unzipped by httpx")
            self._send(200, body, ("Content-Encoding", "gzip"))
        elif self.path.startswith("/coded/"):  # /coded/<Content-Encoding>/<name of a body>
            _, _, coding, name = self.path.split("/")
            body = _CODED[name]
            if name == "cut":  # its framing whole, its gzip stream not
                body = body[: len(body) // 2]
            self._send(200, body, ("Content-Encoding", coding), chunked=name == "bomb")
        elif self.path == "/moved":
            self._send(307, b"", ("Location", "/echo?moved=1"))
        elif self.path == "/hang-up":  # closes without a reply
            self.close_connection = True
        elif self.path == "/cut":  # promises more than it sends, then closes
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
        elif self.path == "/slow":
            self.released.wait(10)
            self._send(200, b"late")
        else:
            self.do_POST()

    def do_POST(self) -> None:
        self.peers.append(self.client_address[1])
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        echoed = f"{self.command} {self.path} {self.headers.get('X-Tag')} ".encode() + body
        self._send(201, echoed, ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Twice", "1"))


class _Server(LoopbackServer):
    def __init__(self) -> None:
        self.peers: list[int] = []
        self.released = threading.Event()
        handler = type("Handler", (_Handler,), {"peers": self.peers, "released": self.released})
        super().__init__(handler)

    def stop(self) -> None:
        self.released.set()
        super().stop()


@pytest.fixture
def server() -> Iterator[_Server]:
    with _Server() as running:
        yield running


def _client(base_url: str, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, transport=AiohttpTransport(), **kwargs)  # type: ignore[arg-type]


async def test_a_request_and_its_reply_go_through_unchanged(server: _Server) -> None:
    async with _client(server.url) as client:
        response = await client.post(
            "/echo?q=a%20b&x=%2F", content=b"payload", headers={"X-Tag": "t1"}
        )
    assert response.status_code == 201
    assert response.reason_phrase == "Created"
    assert response.text == "POST /echo?q=a%20b&x=%2F t1 payload"  # the query quoted as given
    assert response.headers.get_list("Set-Cookie") == ["a=1", "b=2"]
    assert response.http_version == "HTTP/1.1"


async def test_credentials_in_the_url_go_as_httpx_sends_them(server: _Server) -> None:
    # httpx turns them into a basic Authorization header; the URL sent carries none.
    seen: list[str | None] = []
    original = _Handler.do_POST

    def record(handler: _Handler) -> None:
        seen.append(handler.headers.get("Authorization"))
        original(handler)

    server.server.RequestHandlerClass.do_POST = record  # type: ignore[attr-defined]
    url = server.url.replace("http://", "http://us%40er:p%3Ass@")
    async with _client(url) as client:
        assert (await client.post("/echo", content=b"x")).status_code == 201
    assert seen == ["Basic " + base64.b64encode(b"us@er:p:ss").decode()]


async def test_httpx_decodes_the_body_and_follows_redirects(server: _Server) -> None:
    async with _client(server.url, follow_redirects=True) as client:
        assert (await client.get("/gzip")).text == "unzipped by httpx"
        moved = await client.get("/moved")
    assert moved.text == "GET /echo?moved=1 None "
    assert [r.status_code for r in moved.history] == [307]


async def test_connections_are_kept_and_reused(server: _Server) -> None:
    async with _client(server.url) as client:
        for _ in range(5):
            (await client.post("/echo", content=b"x")).raise_for_status()
    assert len(server.peers) == 5 and len(set(server.peers)) == 1


async def test_a_refused_connection_is_a_connect_error_and_ollamas_connection_error(
    server: _Server,
) -> None:
    server.stop()
    async with _client(server.url) as client:
        with pytest.raises(httpx.ConnectError) as raised:
            await client.get("/echo")
    assert not isinstance(raised.value, httpx.TimeoutException)
    ollama_client = ollama.AsyncClient(host=server.url, transport=AiohttpTransport())
    with pytest.raises(ConnectionError, match="Failed to connect to Ollama"):
        await ollama_client.list()
    await ollama_client._client.aclose()


@pytest.mark.parametrize(
    ("path", "error"),
    [("/hang-up", httpx.RemoteProtocolError), ("/cut", httpx.RemoteProtocolError)],
)
async def test_a_server_that_hangs_up_is_a_protocol_error(
    server: _Server, path: str, error: type[Exception]
) -> None:
    async with _client(server.url) as client:
        with pytest.raises(error):
            await client.get(path)


async def test_a_slow_reply_is_a_read_timeout(server: _Server) -> None:
    async with _client(server.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/slow")


async def test_an_unresolvable_host_is_a_connect_error() -> None:
    async with _client("http://imagegen-no-such-host.invalid") as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


def test_each_event_loop_gets_a_session_of_its_own(server: _Server) -> None:
    transport = AiohttpTransport()
    client = httpx.AsyncClient(base_url=server.url, transport=transport)

    async def once() -> str:
        return (await client.post("/echo", content=b"x")).text

    # Two loops one after the other, as a CLI run and then another would use one client.
    assert asyncio.run(once()) == asyncio.run(once()) == "POST /echo None x"

    async def close() -> None:
        await client.aclose()

    asyncio.run(close())


# -- A capped body ------------------------------------------------------------------------


def _capped(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, transport=AiohttpTransport(max_body=CAP))


async def _peak(base_url: str, path: str) -> tuple[bytes | Exception, int]:
    """What a capped client's GET of ``path`` gives, and the most memory it held at once
    (a client of its own, its session made in the count)."""
    tracemalloc.start()
    try:
        async with _capped(base_url) as client:
            try:
                got: bytes | Exception = (await client.get(path)).content
            except httpx.HTTPError as exc:
                got = exc
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_a_compression_bomb_is_over_the_cap_once_decompressed(server: _Server) -> None:
    # 4 KB as sent, chunked, far under the cap; 4 MiB decoded, which httpx would make whole.
    assert len(_CODED["bomb"]) < CAP
    plain, usual = await _peak(server.url, "/coded/gzip/gzip")
    assert plain == PLAIN
    refused, peak = await _peak(server.url, "/coded/gzip/bomb")
    assert isinstance(refused, BodyTooLarge)
    assert str(refused).startswith(f"response body of more than {CAP} bytes once decompressed")
    # Decoding stopped one byte past the cap: no more held than for a body under it, and a cap.
    assert peak < usual + 2 * CAP


async def test_ollamas_client_refuses_a_compression_bomb(server: _Server) -> None:
    """Unasked gzip, as the enhancer's client (``Accept-Encoding: identity``) may still get."""

    def chat(handler: _Handler) -> None:
        handler.rfile.read(int(handler.headers["Content-Length"]))
        handler._send(200, _CODED["bomb"], ("Content-Encoding", "gzip"))

    server.server.RequestHandlerClass.do_POST = chat  # type: ignore[attr-defined]
    client = ollama.AsyncClient(
        host=server.url,
        transport=AiohttpTransport(max_body=CAP),
        headers={"Accept-Encoding": "identity"},
    )
    try:
        with pytest.raises(BodyTooLarge):
            await client.chat(model="m", messages=[{"role": "user", "content": "a fox"}])
    finally:
        await client._client.aclose()


@pytest.mark.parametrize(
    ("coding", "name"),
    [("gzip", "gzip"), ("x-gzip", "gzip"), ("deflate", "zlib"), ("deflate", "raw")],
)
async def test_a_compressed_body_under_the_cap_is_decoded_once(
    server: _Server, coding: str, name: str
) -> None:
    async with _capped(server.url) as client:
        response = await client.get(f"/coded/{coding}/{name}")
    assert response.content == PLAIN
    assert "Content-Encoding" not in response.headers
    assert "Content-Length" not in response.headers  # the length as sent, not handed over


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/coded/br/gzip", "Content-Encoding br not supported"),  # decoded unbounded, if at all
        ("/coded/gzip,gzip/gzip", "Content-Encoding gzip, gzip not supported"),
        ("/coded/deflate/gzip", "deflate: Error -3"),  # neither zlib nor raw deflate
        ("/coded/gzip/cut", "gzip body cut short"),
    ],
)
async def test_a_body_it_cannot_decode_within_the_cap_is_refused(
    server: _Server, path: str, said: str
) -> None:
    async with _capped(server.url) as client:
        with pytest.raises(httpx.DecodingError, match=said):
            await client.get(path)


# -- TLS -----------------------------------------------------------------------------------


async def test_https_verifies_the_server_against_the_given_roots(
    server: _Server, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server.server.socket = served.wrap_socket(server.server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.port}"

    # httpx's default roots (certifi) do not know a self-signed certificate: refused.
    async with _client(url) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/echo")
    trusting = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(base_url=url, transport=AiohttpTransport(verify=trusting)) as ok:
        assert (await ok.post("/echo", content=b"over TLS")).text == "POST /echo None over TLS"
