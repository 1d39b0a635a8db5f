"""At-least-once webhook delivery from the ledger's outbox table.

A message is written in the same transaction as the event that makes it due, so none is lost
when a process dies. Dispatchers (one per ledger replica) claim due messages with a lease:
a message whose sender died is claimed again when the lease runs out. Each claim tries a few
times at once (tenacity); after that the message is due again later, the wait doubling per
claim, until ``max_attempts`` claims have failed: by default the last claim comes about a day
after the first, as Standard Webhooks recommends ("a retry schedule spanning multiple days,
with an exponential backoff", spec/standard-webhooks.md, "Deliverability and reliability").

A receiver that asks to be sent less (429, 502, 504, or any reply with ``Retry-After``) is not
tried again within the claim, and its next claim waits for what ``Retry-After`` asked, up to
``backoff_max``; one that answers 410 Gone ends the message (state ``failed``) at once. Nor is
a try that ran out of time: the receiver may have the message and still be at work on it, so a
quick copy would only add to its load; the next claim waits out the backoff.

A claim's tries all end before its lease does, so no other dispatcher sends the message
meanwhile; an outcome is recorded only while the message is still on the claim that sent it,
so a dispatcher that overran its lease cannot overwrite a later claim's. Only as many messages
are claimed as there are free senders, and at most one per receiver (scheme, host and port) at
a time: a receiver that is slow or never answers holds one sender, however many messages it
has waiting, and only its own messages wait for it. That holds across the replicas sharing the
database: a claim marks its receiver as being sent to until its outcome or its lease's end
(migration 0009), and no replica claims for a receiver so marked.

Stopping (:meth:`Dispatcher.stop`, run as the interpreter exits, as a worker does at SIGTERM)
claims nothing more, lets each send under way end its current try (at most the sender's
timeout, with no quick try after it), and gives back any message claimed but not sent: due
again at once, its attempts as before the claim, its receiver free for every replica. It waits
a bounded time (:data:`STOP_SECONDS` at most), well within a worker's grace period: a claim or
an outcome stuck on a database that stopped answering (a hung server, a stuck pooler: TCP sees
no fault while the peer's kernel acknowledges) is left behind, on daemon threads that hold up
no exit, and its message is sent again after its lease (at least once, as ever).

What it does is seen in ``imagegen.webhook.deliveries`` (each claim's outcome), in
``imagegen.webhook.backlog`` (the messages due and not being sent: a receiver that does not
answer leaves its own waiting there) and in a log line per claim that failed, naming the
generation and the receiver (scheme, host and port: never the path, query or user-info, which
may hold a caller's token).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime

import httpx
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_when_event_set,
    wait_exponential,
)

from imagegen._threads import DaemonPool
from imagegen.errors import ImageGenError
from imagegen.ledger.models import Delivery
from imagegen.ledger.store import Ledger
from imagegen.ledger.webhooks import WebhookFailed, WebhookRefused, WebhookSender, receiver
from imagegen.telemetry import instruments, observe

__all__ = ["OUTCOMES", "STOP_SECONDS", "Dispatcher", "backlog"]

log = logging.getLogger("imagegen.ledger")

# Of a claim's lease, the part its tries may use: the rest is for recording the outcome.
_LEASE_USED = 0.9

STOP_SECONDS = 30.0
"""Longest :meth:`Dispatcher.stop` waits, half the ledger's grace period at SIGTERM
(``timeoutSeconds`` in knative/base/ledger.yaml): the sends under way get their try and the
recording of its outcome (the sender's timeout and :data:`_RECORD_S`) within it."""

# Seconds stop() waits for a database call it needs before giving up on it: a claim under way,
# or an outcome being recorded after the send's try. A database that answers takes
# milliseconds; one that went silent never does.
_RECORD_S = 5.0

OUTCOMES = ("delivered", "retried", "failed", "refused")
"""The ``outcome`` of a claim in ``imagegen.webhook.deliveries``: delivered; not, and due again
later (``retried``); not, on its last claim (``failed``: given up); or ``refused`` (a URL not
allowed, a receiver gone: given up at once)."""

# Due messages, read by the partial index webhook_deliveries_due (migration 0001: on
# next_attempt_at, where state = 'pending'): the cost grows with the messages due, not with
# the table.
_BACKLOG = (
    "SELECT COUNT(*) AS due FROM webhook_deliveries "
    "WHERE state = 'pending' AND next_attempt_at <= :now"
)


def backlog(ledger: Ledger) -> int | None:
    """Messages due and not being sent, in the whole ledger (every replica's); None when the
    ledger cannot be read now (the database down: no value rather than a wrong one).

    One ``COUNT`` on the outbox's index of pending messages by due time: about a millisecond
    for 5,000 due among 200,000 sent, on SQLite and PostgreSQL alike. Read where no dispatcher
    runs too (webhooks off): the messages then wait, and the gauge shows them.
    """
    # A read that takes no write lock where the ledger has one (SqlLedger.statement).
    read = getattr(ledger, "statement", ledger.transaction)
    try:
        with read() as db:
            [row] = db.query(_BACKLOG, {"now": datetime.now(UTC)})
    except ImageGenError as exc:
        log.debug("webhook backlog not read: %s", exc.message)
        return None
    due: int = row["due"]
    return due


class Dispatcher:
    """Sends the ledger's due webhook messages.

    Args:
        ledger: Where the messages wait.
        sender: Signs and sends one message.
        max_attempts: Claims before a message is given up (state ``failed``).
        quick_tries: Tries within one claim (a blip should not wait for the next claim); a
            receiver that asks to be sent less gets one.
        backoff: Seconds before the second claim; doubles per claim, ± 20 % jitter.
        backoff_max: Longest wait between claims, a receiver's ``Retry-After`` included.
        lease: Seconds a claimed message is hidden from other dispatchers; a claim's tries
            end before it does.
        workers: Messages sent at once, one per receiver (a slow receiver holds one sender,
            not the others' messages).
    """

    def __init__(
        self,
        ledger: Ledger,
        sender: WebhookSender,
        *,
        max_attempts: int = 15,
        quick_tries: int = 3,
        backoff: float = 5.0,
        backoff_max: float = 43200.0,
        lease: float = 120.0,
        workers: int = 4,
    ) -> None:
        self.ledger = ledger
        self.sender = sender
        self.max_attempts = max_attempts
        self.quick_tries = quick_tries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.lease = lease
        self.workers = workers
        # Daemon threads: a sender stuck on a database that went silent (recording an
        # outcome) holds up neither stop() nor the interpreter's exit, which joins the threads
        # of every ThreadPoolExecutor.
        self._pool = DaemonPool("imagegen-webhook", max_threads=workers)
        self._busy = 0  # messages being sent
        self._busy_lock = threading.Lock()
        self._idle = threading.Condition(self._busy_lock)  # notified as _busy falls to 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Held while claiming and handing the claim to the senders: stop() waits (a while)
        # for a claim under way, and none starts after it.
        self._claiming = threading.Lock()
        self._thread: threading.Thread | None = None
        self._unobserve: Callable[[], None] | None = None

    def run_once(self) -> int:
        """Claim due messages (one per free sender), make one claim's tries at each, wait for
        those; returns how many were claimed."""
        sending = self._claim()
        for future in sending:
            future.result()
        return len(sending)

    def _claim(self) -> list[Future[None]]:
        """Claim as many due messages as there are free senders, one per receiver not being
        sent to already (:meth:`Ledger.claim_deliveries`), and start sending them."""
        with self._claiming:
            if self._stop.is_set():  # stopping: nothing is claimed that may not be sent
                return []
            with self._busy_lock:
                free = self.workers - self._busy
            if free <= 0:
                return []
            claimed = self.ledger.claim_deliveries(limit=free, lease=self.lease)
            ends = time.monotonic() + self.lease * _LEASE_USED
            sending = []
            for n, delivery in enumerate(claimed):
                try:
                    sending.append(self._send(delivery, ends))
                except RuntimeError:
                    # No thread to send it on: every sender busy (PoolExhausted), or the
                    # interpreter exiting (no thread starts then). Given back, not stranded.
                    self._release(claimed[n:])
                    break
            return sending

    def _send(self, delivery: Delivery, ends: float) -> Future[None]:
        """Start one claim's tries at ``delivery`` on a sender thread; the future ends with
        them (and raises what recording the outcome raised)."""
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()

        def task() -> Callable[[], None]:
            try:
                self._deliver(delivery, ends)
            except BaseException as exc:  # handed to the future, as an executor does
                return functools.partial(future.set_exception, exc)
            return functools.partial(future.set_result, None)

        with self._busy_lock:
            self._busy += 1
        try:
            self._pool.submit(task)
        except BaseException:
            with self._busy_lock:
                self._busy -= 1
            raise
        future.add_done_callback(self._sent)
        return future

    def _release(self, deliveries: list[Delivery]) -> None:
        """Give back messages claimed and not sent: due at once, their attempts as before the
        claim, their receivers free (:meth:`Ledger.release_deliveries`)."""
        if not deliveries:
            return
        try:
            self.ledger.release_deliveries(deliveries)
        except ImageGenError as exc:  # the database down: the leases run out instead
            log.warning(
                "webhook messages not given back: %s; sent after their lease",
                exc.message,
                extra={"msg_ids": [d.msg_id for d in deliveries]},
            )

    def _sent(self, future: Future[None]) -> None:
        with self._busy_lock:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()
        self._wake.set()  # a sender is free: claim the next message
        failed = future.exception()
        if failed is not None:
            # The outcome could not be recorded (the database down after the send): said here,
            # where nothing else would; the message is claimed again once its lease runs out.
            log.error(
                "webhook outcome not recorded: %s: %s; sent again after its lease",
                type(failed).__name__,
                failed,
            )

    def _deliver(self, delivery: Delivery, ends: float) -> None:
        """One claim's tries at ``delivery``, all before ``ends`` (monotonic); the outcome."""
        if self._stop.is_set():  # stopping before its first try: given back, not sent
            self._release([delivery])
            return
        retrying = Retrying(
            # Stopping ends the claim after the try under way.
            stop=stop_after_attempt(self.quick_tries)
            | stop_before_delay(max(0.0, ends - time.monotonic()))
            | stop_when_event_set(self._stop),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception(_worth_another_try),
            reraise=True,
        )
        said: dict[str, object] = {
            "msg_id": delivery.msg_id,
            "generation_id": delivery.generation_id,
            "receiver": _receiver(delivery.url),
        }
        try:
            retrying(self.sender.send, delivery, deadline=ends)
        except WebhookRefused as exc:  # a refused URL, or a receiver gone (410): given up
            log.warning("webhook refused", extra={**said, "reason": exc.message})
            self._finish(delivery, "refused", error=exc.message, retry_in=None)
        except WebhookFailed as exc:
            retry_in = self.retry_in(delivery.attempts, retry_after=exc.retry_after)
            reason = exc.message
            if exc.retry_after is not None and retry_in is not None:
                # Where the next round is not when the receiver asked (sooner: it asked for more
                # than backoff_max; later: for less than this round's backoff), the reason says
                # when it is.
                kept = f"{retry_in:.0f}"
                if kept != f"{exc.retry_after:.0f}":
                    reason += f"; next round in {kept} s"
            said.update(reason=reason, status=exc.status_code, attempts=delivery.attempts)
            if retry_in is None:  # its last claim: a receiver's loss, said louder than a retry
                log.warning("webhook given up", extra=said)
            else:
                log.info("webhook not delivered", extra={**said, "retry_in": retry_in})
            outcome = "failed" if retry_in is None else "retried"
            self._finish(delivery, outcome, error=reason, retry_in=retry_in)
        except Exception as exc:
            # A bug, or a URL no one foresaw: counted as a failed claim like any other, so
            # the message ends (failed) after max_attempts instead of coming back forever.
            retry_in = self.retry_in(delivery.attempts)
            log.exception(
                "webhook send raised",
                extra={**said, "attempts": delivery.attempts, "retry_in": retry_in},
            )
            error = f"internal error: {type(exc).__name__}"
            outcome = "failed" if retry_in is None else "retried"
            self._finish(delivery, outcome, error=error, retry_in=retry_in)
        else:
            self._finish(delivery, "delivered", retry_in=None)

    def _finish(
        self,
        delivery: Delivery,
        outcome: str,
        *,
        error: str | None = None,
        retry_in: float | None,
    ) -> None:
        # Counted before it is recorded: the receiver answered (or not) whether or not the
        # database then takes the outcome.
        instruments().webhook_deliveries.add(1, {"outcome": outcome})
        delivered = outcome == "delivered"
        recorded = self.ledger.finish_delivery(
            delivery.msg_id,
            delivered=delivered,
            error=error,
            retry_in=retry_in,
            attempts=delivery.attempts,
        )
        if not recorded:
            log.warning(
                "webhook outcome not recorded: the message was claimed again meanwhile",
                extra={"msg_id": delivery.msg_id, "delivered": delivered},
            )

    def backlog(self) -> int | None:
        """Messages due and not being sent, in the whole ledger: :func:`backlog`."""
        return backlog(self.ledger)

    def retry_in(self, attempts: int, *, retry_after: float | None = None) -> float | None:
        """Seconds until the next claim after ``attempts`` failed claims; None: give up.

        Args:
            attempts: Failed claims so far, the last included.
            retry_after: Seconds the receiver's ``Retry-After`` asked for: the wait is at
                least that, up to ``backoff_max``.
        """
        if attempts >= self.max_attempts:
            return None
        wait: float = min(self.backoff_max, self.backoff * 2.0 ** (attempts - 1))
        wait *= random.uniform(0.8, 1.2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.backoff_max))
        return wait

    # -- background loop ------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due messages now (a new one was just written)."""
        self._wake.set()

    def start(self, *, poll: float = 5.0) -> None:
        """Send due messages from a background thread until :meth:`stop`, which runs by
        itself as the interpreter exits (a server's worker at SIGTERM)."""

        def loop() -> None:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    started = len(self._claim())
                except ImageGenError as exc:  # the database down: said in a line, tried again
                    log.warning("webhook dispatch failed: %s", exc.message)
                    started = 0
                except Exception:
                    log.exception("webhook dispatch failed")
                    started = 0
                if not started:  # nothing due, or every sender busy: until one is free
                    self._wake.wait(poll)

        for outcome in OUTCOMES:  # from 0: a first failure is then an increase (telemetry)
            instruments().webhook_deliveries.add(0, {"outcome": outcome})
        self._unobserve = observe("webhook_backlog", self.backlog)
        self._thread = threading.Thread(target=loop, name="imagegen-webhooks", daemon=True)
        self._thread.start()
        _stop_at_exit(self)

    def stop(self) -> None:
        """Stop claiming; let each send under way end its current try (at most the sender's
        timeout) and record its outcome; give back what was claimed and not sent; release the
        sender. Idempotent.

        Waits :data:`STOP_SECONDS` at most: a claim that has not ended in :data:`_RECORD_S`,
        or an outcome not recorded by then after its try, is left behind (a database that
        stopped answering), its message sent again after its lease.
        """
        started = time.monotonic()
        ends = started + min(STOP_SECONDS, self.sender.timeout + _RECORD_S)
        self._stop.set()  # first: a claim stuck on the database must not keep it from being set
        self._wake.set()
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        # A claim under way hands its messages to the senders, which give them back.
        claimed_by = min(ends, started + _RECORD_S)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, claimed_by - time.monotonic()))
        if self._claiming.acquire(timeout=max(0.0, claimed_by - time.monotonic())):
            self._claiming.release()
        else:
            log.warning(
                "webhook dispatcher stopped during a claim that did not end in %gs; its "
                "messages are sent after their lease",
                _RECORD_S,
            )
        with self._idle:
            sending = not self._idle.wait_for(
                lambda: not self._busy, timeout=max(0.0, ends - time.monotonic())
            )
            left = self._busy
        if sending:  # the process exits without them: each is sent again after its lease
            log.warning(
                "webhook dispatcher stopped with %d send(s) under way after %.0fs; their "
                "messages are sent again after their lease",
                left,
                time.monotonic() - started,
            )
        else:
            self.sender.close()


def _stop_at_exit(dispatcher: Dispatcher) -> None:
    """Stop ``dispatcher`` as the interpreter exits (a server's worker at SIGTERM).

    threading's exit hooks run before its threads are joined (CPython's Lib/threading.py,
    ``_shutdown``), and the senders are daemon threads, which nothing else waits for: this is
    what lets a send under way end its current try and record its outcome, and gives back what
    was claimed and not sent, within :data:`STOP_SECONDS`. Held weakly: a dispatcher stopped
    and dropped is not kept for it.
    """
    held = weakref.ref(dispatcher)

    def stop() -> None:
        alive = held()
        if alive is not None:
            alive.stop()

    threading._register_atexit(stop)  # type: ignore[attr-defined]  # not in typeshed


def _receiver(url: str) -> str:
    """Who a message goes to, fit for a log line (:func:`~.webhooks.receiver`: never the
    path, query or user-info, any of which may hold the caller's token)."""
    try:
        return receiver(url)
    except ValueError:  # an unbalanced IPv6 bracket, a port out of range: nothing to trust
        return "***"


def _worth_another_try(exc: BaseException) -> bool:
    """Whether a failed try is tried again within the claim: not when the receiver asked to
    be sent less (Standard Webhooks: 429 and 502/504 "throttle", ``Retry-After`` "should be
    taken into consideration when scheduling the next attempt"), nor when the try ran out of
    time (the receiver may be processing the message still: Standard Webhooks' "Request
    timeouts" gives it 15 to 30 s, and another copy at once is more load, not more time)."""
    return isinstance(exc, WebhookFailed) and not exc.throttled and not _timed_out(exc)


def _timed_out(exc: WebhookFailed) -> bool:
    """Whether the sender gave up waiting (connecting, the name's resolution or the reply):
    the timeout it raised from is kept as the failure's context."""
    return isinstance(exc.__context__, TimeoutError | httpx.TimeoutException)
