"""A PostgreSQL server that stops answering on connections it accepted (a network partition, a
hung server): the event in flight is answered at the function's timeout, and the worker still
exits at SIGTERM, well within its grace period, rather than waiting on the socket for good; so
does a worker whose webhook dispatcher is claiming, or recording an outcome, on it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from imagegen.ledger.postgres import PostgresLedger
from imagegen.stages.ledger import TIMEOUT_S
from tests.functions.servers import FunctionServer, free_port
from tests.ledger.chain import binary, chain
from tests.ledger.test_outbox import _raw_receiver
from tests.ledger.test_webhooks import OLD


class SilencingProxy:
    """A TCP proxy on loopback in front of ``target``: it forwards both ways until
    :meth:`silence`, then goes silent on every connection, old and new: what comes is read
    and dropped, nothing is sent, and no connection is closed (the peer's kernel still
    acknowledges, as a hung server's does)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._silent = threading.Event()
        self.dropped = threading.Event()
        """Set once something sent while silent was dropped: a call waits on the silence."""
        self._listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def silence(self) -> None:
        self._silent.set()

    def close(self) -> None:
        """Close every connection, the database's side too (its server then ends the session
        and releases what it held: a test's schema is dropped after)."""
        self._listener.close()
        for sock in self._held:
            # Shut down first: a close alone, while a thread waits in recv on the socket,
            # neither wakes it nor sends the peer its end (Linux keeps the socket open).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self._held.append(client)
            if self._silent.is_set():
                threading.Thread(target=self._drop, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self._target)
            self._held.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self._silent.is_set():
                    self.dropped.set()
                    continue  # read and dropped
                sink.sendall(data)
        except OSError:
            pass

    def _drop(self, sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                self.dropped.set()
        except OSError:
            pass


@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_connections_give_up_on_a_silent_peer_unless_the_url_says(ledger_url: str) -> None:
    def parameters(url: str) -> dict[str, str | None]:
        ledger = PostgresLedger(url, min_size=1, max_size=1)
        try:
            with ledger._pool.connection() as conn:
                return {
                    option.keyword.decode(): option.val.decode() if option.val else None
                    for option in conn.pgconn.info
                }
        finally:
            ledger.close()

    given = parameters(ledger_url)
    assert given["keepalives"] == "1"
    assert given["keepalives_idle"] == "10"
    assert given["keepalives_interval"] == "5"
    assert given["keepalives_count"] == "3"
    assert given["tcp_user_timeout"] == "20000"
    assert given["connect_timeout"] == "5"
    own = parameters(f"{ledger_url}&tcp_user_timeout=7000&keepalives_idle=60&connect_timeout=3")
    assert (own["tcp_user_timeout"], own["keepalives_idle"]) == ("7000", "60")
    assert (own["connect_timeout"], own["keepalives_count"]) == ("3", "3")


@pytest.mark.slow
@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_worker_stuck_on_a_silent_database_exits_at_sigterm(
    ledger_url: str, tmp_path: Path
) -> None:
    parts = urlsplit(ledger_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = SilencingProxy((parts.hostname, parts.port))
    user = f"{parts.username}@" if parts.username else ""
    proxied = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    # A new interpreter, as in its container: the exit that waited on the stuck call is the
    # interpreter's own (it joins the threads of the loop's default executor).
    server = FunctionServer(
        "ledger", {"IMAGEGEN_LEDGER_URL": proxied}, log_dir=tmp_path, fresh=True
    ).start()
    try:
        events = chain("gen-silent")
        assert server.post("/", **binary(events["requested"])).status_code == 202
        proxy.silence()
        started = time.monotonic()
        answer = server.post("/", **binary(events["enhanced"]))
        waited = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert TIMEOUT_S - 1 < waited < TIMEOUT_S + 10, waited
        assert server.process is not None
        os.killpg(server.process.pid, signal.SIGTERM)
        sigterm = time.monotonic()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 10 s after SIGTERM:\n{server.logs()}")
        assert time.monotonic() - sigterm < 10
    finally:
        server.kill()
        proxy.close()


@contextmanager
def _proxied(ledger_url: str) -> Iterator[tuple[SilencingProxy, str]]:
    """A :class:`SilencingProxy` in front of ``ledger_url``'s server, and the URL through it."""
    parts = urlsplit(ledger_url)
    assert parts.hostname is not None and parts.port is not None
    proxy = SilencingProxy((parts.hostname, parts.port))
    user = f"{parts.username}@" if parts.username else ""
    try:
        yield proxy, urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))
    finally:
        proxy.close()


def _serve_with_webhooks(url: str, tmp_path: Path) -> FunctionServer:
    env = {
        "IMAGEGEN_LEDGER_URL": url,
        "IMAGEGEN_WEBHOOK_SECRETS": OLD,
        "IMAGEGEN_WEBHOOK_ALLOWED": "127.0.0.0/8",
        "IMAGEGEN_WEBHOOK_TIMEOUT": "2",
    }
    # A new interpreter, as in its container: the exit held up was the interpreter's own (its
    # exit hooks, and the threads it joins).
    return FunctionServer("ledger", env, log_dir=tmp_path, fresh=True).start()


def _exits_soon_after_sigterm(server: FunctionServer, seconds: float = 15.0) -> float:
    """SIGTERM ``server`` and wait for it to exit; how long that took."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGTERM)
    sigterm = time.monotonic()
    try:
        server.process.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {seconds:g} s after SIGTERM:\n{server.logs()}")
    return time.monotonic() - sigterm


@pytest.mark.slow
@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_dispatcher_claiming_on_a_silent_database_holds_up_no_exit(
    ledger_url: str, tmp_path: Path
) -> None:
    """Webhooks on, no message due: the dispatcher's look for due messages (at an event, and
    every 5 s) waits on the silent database for good; the worker still exits soon after
    SIGTERM."""
    with _proxied(ledger_url) as (proxy, url):
        server = _serve_with_webhooks(url, tmp_path)
        try:
            # Recorded: the database opened and the dispatcher started, all before the silence.
            event = chain("gen-quiet")["requested"]
            assert server.post("/", **binary(event)).status_code == 202
            proxy.silence()
            assert proxy.dropped.wait(15), "nothing asked the database"
            # What asked may be another thread (a metric's look at the backlog): the
            # dispatcher's own look comes at most one poll later (outbox.py, ``start``: 5 s).
            time.sleep(6)
            assert _exits_soon_after_sigterm(server) < 15
        finally:
            server.kill()
    said = [r.get("message", "") for r in server.log_records()]
    assert any(m.startswith("webhook dispatcher stopped during a claim") for m in said), said


@pytest.mark.slow
@pytest.mark.parametrize("ledger_url", ["postgres"], indirect=True)
def test_a_send_whose_outcome_waits_on_a_silent_database_holds_up_no_exit(
    ledger_url: str, tmp_path: Path
) -> None:
    """A message is being sent to a receiver that never answers when the database goes
    silent: the try ends at the sender's timeout, and recording its outcome waits for good;
    the worker still exits soon after SIGTERM, the message left pending (sent again after its
    lease)."""
    came = threading.Event()
    done = threading.Event()

    def never_answers(conn: socket.socket) -> None:
        came.set()
        done.wait(60)

    with _raw_receiver(never_answers) as hook, _proxied(ledger_url) as (proxy, url):
        server = _serve_with_webhooks(url, tmp_path)
        try:
            event = chain("gen-unanswered", webhook=hook, webhook_events=["started"])
            assert server.post("/", **binary(event["requested"])).status_code == 202
            assert came.wait(15), "the message was never sent"
            proxy.silence()
            assert _exits_soon_after_sigterm(server) < 15
        finally:
            done.set()
            server.kill()
    said = [r.get("message", "") for r in server.log_records()]
    assert any(m.startswith("webhook dispatcher stopped with 1 send") for m in said), said
    ledger = PostgresLedger(ledger_url, min_size=1, max_size=1)
    try:
        state = ledger.delivery_states("gen-unanswered")["started"]
        assert (state["state"], state["attempts"]) == ("pending", 1)
    finally:
        ledger.close()
