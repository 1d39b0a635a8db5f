"""At-least-once webhook delivery from the ledger's outbox table.

A message is written in the same transaction as the event that makes it due, so none is lost
when a process dies. Dispatchers (one per ledger replica) claim due messages with a lease:
a message whose sender died is claimed again when the lease runs out. Each claim tries a few
times at once (tenacity); after that the message is due again later, the wait doubling per
claim, until ``max_attempts`` claims have failed.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from imagegen.ledger.models import Delivery
from imagegen.ledger.store import Ledger
from imagegen.ledger.webhooks import WebhookFailed, WebhookRefused, WebhookSender

__all__ = ["Dispatcher"]

log = logging.getLogger("imagegen.ledger")


class Dispatcher:
    """Sends the ledger's due webhook messages.

    Args:
        ledger: Where the messages wait.
        sender: Signs and sends one message.
        max_attempts: Claims before a message is given up (state ``failed``).
        quick_tries: Tries within one claim (a blip should not wait for the next claim).
        backoff: Seconds before the second claim; doubles per claim, ± 20 % jitter.
        backoff_max: Longest wait between claims.
        lease: Seconds a claimed message is hidden from other dispatchers.
        workers: Messages sent at once (a slow receiver does not hold up the others).
    """

    def __init__(
        self,
        ledger: Ledger,
        sender: WebhookSender,
        *,
        max_attempts: int = 8,
        quick_tries: int = 3,
        backoff: float = 5.0,
        backoff_max: float = 3600.0,
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
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="imagegen-webhook")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Claim the due messages and make one claim's tries at each; returns how many."""
        claimed = self.ledger.claim_deliveries(limit=32, lease=self.lease)
        list(self._pool.map(self._deliver, claimed))
        return len(claimed)

    def _deliver(self, delivery: Delivery) -> None:
        retrying = Retrying(
            stop=stop_after_attempt(self.quick_tries),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            retry=retry_if_exception_type(WebhookFailed),
            reraise=True,
        )
        try:
            retrying(self.sender.send, delivery)
        except WebhookRefused as exc:
            log.warning("webhook refused", extra={"msg_id": delivery.msg_id, "reason": exc.message})
            self.ledger.finish_delivery(
                delivery.msg_id, delivered=False, error=exc.message, retry_in=None
            )
        except WebhookFailed as exc:
            retry_in = self.retry_in(delivery.attempts)
            log.info(
                "webhook not delivered",
                extra={"msg_id": delivery.msg_id, "reason": exc.message, "retry_in": retry_in},
            )
            self.ledger.finish_delivery(
                delivery.msg_id, delivered=False, error=exc.message, retry_in=retry_in
            )
        else:
            self.ledger.finish_delivery(delivery.msg_id, delivered=True, retry_in=None)

    def retry_in(self, attempts: int) -> float | None:
        """Seconds until the next claim after ``attempts`` failed claims; None: give up."""
        if attempts >= self.max_attempts:
            return None
        wait: float = min(self.backoff_max, self.backoff * 2.0 ** (attempts - 1))
        return wait * random.uniform(0.8, 1.2)

    # -- background loop ------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due messages now (a new one was just written)."""
        self._wake.set()

    def start(self, *, poll: float = 5.0) -> None:
        """Send due messages from a background thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    busy = self.run_once()
                except Exception:
                    log.exception("webhook dispatch failed")
                    busy = 0
                if not busy:
                    self._wake.wait(poll)

        self._thread = threading.Thread(target=loop, name="imagegen-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after the current round; release the sender."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown()
        self.sender.close()
