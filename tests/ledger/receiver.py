"""A webhook receiver on loopback that checks signatures with the Standard Webhooks library.

It misbehaves on purpose, per message: ``fail_first`` ids get a 500 on their first attempt,
``slow_first`` ids an answer slower than the sender waits, ``/redirect`` a 302 elsewhere.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.fakes.loopback import LoopbackServer


class Receiver:
    def __init__(self, secret: str, *, fail_first: set[str], slow_first: set[str], slow: float):
        self.verifier = Webhook(secret)
        self.fail_first = fail_first
        self.slow_first = slow_first
        self.slow = slow
        self.attempts: Counter[str] = Counter()
        self.accepted: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.rejected: list[str] = []
        self.paths: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.url = ""

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            self.paths[path] += 1
        if path == "/redirect":
            return 302, {"location": "/hook"}
        if path == "/down":
            return 503, {}
        try:
            payload = self.verifier.verify(body, headers)
        except WebhookVerificationError as exc:
            with self.lock:
                self.rejected.append(str(exc))
            return 401, {}
        msg_id = headers["webhook-id"]
        with self.lock:
            self.attempts[msg_id] += 1
            first = self.attempts[msg_id] == 1
        if first and msg_id in self.fail_first:
            return 500, {}
        if first and msg_id in self.slow_first:
            self.closing.wait(self.slow)
        with self.lock:
            self.accepted[msg_id].append(payload)
        return 204, {}


@contextmanager
def serve(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra = receiver.handle(self.path, headers, body)
            try:
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()
            except OSError:
                pass  # the sender gave up waiting

        def log_message(self, *args: Any) -> None:
            pass

    with LoopbackServer(Handler, name="webhook-receiver") as server:
        receiver.url = server.url
        try:
            yield receiver
        finally:
            receiver.closing.set()


def types_of(payloads: list[dict[str, Any]]) -> set[str]:
    return {p["type"] for p in payloads}
