"""A circuit breaker for the LLM: stop calling a dependency that keeps failing, then probe it.

Closed: calls go through; ``threshold`` failures in a row open the circuit. Open: calls are
refused at once for ``cooldown`` seconds. Half-open: one call (the probe) goes through while
every other is refused; its success closes the circuit, its failure opens it again. A failure
seen outside a call (a start-up check finding the dependency down) can open it at once
(:meth:`CircuitBreaker.trip`). A call that started before the circuit last opened changes
nothing when it ends: it says how the dependency was before that, and only the probe decides
an open circuit. An error the caller marks as no sign of the dependency's health (``exclude``,
as pybreaker's ``exclude``: a business error, not a system one) counts as a success, as
pybreaker counts it (``pybreaker/__init__.py``, ``CircuitBreaker.is_system_error`` and
``CircuitBreakerState._handle_error``): the dependency answered.

Written here rather than taken from pybreaker, which is thread-based (its coroutine support
needs tornado) and lets every concurrent call through while half-open; an asyncio service
needs exactly one probe among many concurrent requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from imagegen.telemetry import instruments

__all__ = ["CircuitBreaker", "CircuitOpen", "State"]

logger = logging.getLogger("imagegen.enhance")

State = Literal["closed", "open", "half_open"]


class CircuitOpen(Exception):
    """The circuit is open (or its probe is in flight): the call was not made.

    Attributes:
        retry_after: Seconds until a call may go through: the rest of the cool-down, or, while
            the probe is in flight, a moment.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitBreaker:
    """Counts consecutive failures of one dependency and refuses calls while it is down.

    Args:
        name: The dependency, for logs and the ``imagegen.circuit.transitions`` metric.
        threshold: Consecutive failures that open the circuit; 0 never opens it.
        cooldown: Seconds the circuit stays open before one probe goes through.
        clock: Monotonic seconds (tests pass their own).
        exclude: Whether an error leaving a call says nothing against the dependency (it
            answered, and the answer was of no use): such a call counts as a success.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        exclude: Callable[[BaseException], bool] = lambda exc: False,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._exclude = exclude
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._openings = 0  # times the circuit opened: a call's outcome counts in its own
        self._probing = False

    @property
    def state(self) -> State:
        """The state now (an open circuit whose cool-down has passed reads ``half_open``)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown:
            self._move("half_open", f"cool-down of {self.cooldown:g}s over")
        return self._state

    @asynccontextmanager
    async def call(self) -> AsyncIterator[bool]:
        """``async with breaker.call() as probe:`` around one call of the dependency.

        An exception leaving the block counts as a failure, unless ``exclude`` says it does
        not; a normal exit (or an excluded exception) as a success.
        ``probe`` is True for the half-open circuit's one call, which decides it.

        Raises:
            CircuitOpen: The circuit is open, or half-open with its probe already in flight.
        """
        state = self.state
        if state == "open" or (state == "half_open" and self._probing):
            left = self._opened_at + self.cooldown - self._clock() if state == "open" else 0.0
            raise CircuitOpen(
                f"{self.name}: circuit {state.replace('_', '-')}", retry_after=max(left, 1.0)
            )
        probe = state == "half_open"
        self._probing = self._probing or probe
        # A call that was in flight when the circuit opened would otherwise close it, while
        # open, on a success, or reopen it on a failure while the probe is in flight: neither
        # says anything about the dependency now.
        openings = self._openings
        try:
            yield probe
        except Exception as exc:  # a cancelled call says nothing about the dependency
            if openings == self._openings:
                if self._exclude(exc):
                    self._succeeded()
                else:
                    self._failed()
            raise
        else:
            if openings == self._openings:
                self._succeeded()
        finally:
            if probe:
                self._probing = False

    def trip(self, reason: str) -> None:
        """Open the circuit now, for a full cool-down: the dependency was found down outside
        a call (``reason`` says how). Nothing changes with a threshold of 0 (it never opens) or
        a circuit already open."""
        # The state as it reads now: an open circuit past its cool-down is half-open, and
        # opens again for a full one.
        if self.threshold and self.state != "open":
            self._opened_at = self._clock()
            self._move("open", reason)

    def _failed(self) -> None:
        self._failures += 1
        if self._state == "half_open":
            self._opened_at = self._clock()
            self._move("open", "the probe failed")
        elif self.threshold and self._failures >= self.threshold and self._state == "closed":
            self._opened_at = self._clock()
            self._move("open", f"{self._failures} consecutive failures")

    def _succeeded(self) -> None:
        self._failures = 0
        if self._state != "closed":
            self._move("closed", "the probe succeeded")

    def _move(self, state: State, reason: str) -> None:
        previous, self._state = self._state, state
        if state == "open":
            self._openings += 1
        # Opening is the news (the dependency is down); the probe and the recovery that
        # follow are its expected course.
        level = logging.WARNING if state == "open" else logging.INFO
        logger.log(level, "circuit %s: %s -> %s (%s)", self.name, previous, state, reason)
        instruments().circuit_transitions.add(1, {"dependency": self.name, "state": state})
