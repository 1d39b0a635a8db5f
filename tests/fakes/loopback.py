"""Servers on a loopback port for the tests: started, stopped and used as a ``with`` alike."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from tests.knative.delivery import TTL, ingress_ttl

__all__ = ["LoopbackServer", "Running", "broker_ingress"]


class Running:
    """``with server:`` starts it and stops it; a server says what :meth:`start`/:meth:`stop` do."""

    def start(self) -> Self:
        return self

    def stop(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hung up (a timeout under test, a stopped pool) is a normal event for a
        # server, as for gunicorn: not a traceback on stderr. Anything else still is one.
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class LoopbackServer(Running):
    """``handler`` answering HTTP on 127.0.0.1 from a thread of its own, once started.

    Args:
        handler: The request handler class.
        port: The port to listen on; 0 (the default) takes a free one, read back as ``port``.
        name: The name of the serving thread.
    """

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], *, port: int = 0, name: str = "loopback"
    ) -> None:
        self.server: ThreadingHTTPServer = _Server(("127.0.0.1", port), handler)
        # Requests in flight never hold up stop(): their threads are not waited for.
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name=name, daemon=True
        )

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: clients now get "connection refused"."""
        if self._thread.ident is not None:  # shutdown() waits for a loop that was never run
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()


@contextmanager
def broker_ingress(status: int = 202) -> Iterator[tuple[str, list[tuple[dict[str, str], Any]]]]:
    """A broker ingress on loopback: its URL, and the headers (lower-case) and JSON body of each
    event POSTed to it; every valid event answered ``status``.

    As knative/eventing's ingress (pkg/broker/ingress/ingress_handler.go, ``ServeHTTP`` and
    ``receive``): a request that is no valid CloudEvent (``binding.ToEvent`` fails, or
    ``event.Validate``) is a 400 and is not taken, nor is an event whose ``knativebrokerttl``,
    once the ingress has defaulted and reduced it (:func:`ingress_ttl`), is at or below 0.
    """
    from tests.knative.cloudevents_http import MalformedEvent, Message, decode

    received: list[tuple[dict[str, str], Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                event = decode(Message(headers, body))
            except MalformedEvent:
                event = None
            if event is None or ingress_ttl(event.get(TTL)) <= 0:
                self.send_response(400)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            received.append((headers, json.loads(body)))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Handler, name="broker-ingress") as server:
        yield server.url, received
