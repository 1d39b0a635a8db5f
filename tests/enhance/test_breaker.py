"""The Ollama circuit breaker: opens after failures in a row, one probe when half-open."""

from __future__ import annotations

import asyncio
import logging

import pytest

from imagegen.enhance._breaker import CircuitBreaker, CircuitOpen
from imagegen.enhance.llm import OllamaEnhancer
from imagegen.errors import DependencyUnavailable
from imagegen.models import GenerationRequest
from imagegen.modelspec import family_for
from imagegen.settings import Settings
from tests.enhance.conftest import MakeStage
from tests.fakes.ollama_server import Behaviour, FakeOllama, http_error, not_json, reply


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(RuntimeError):
        async with breaker.call():
            raise RuntimeError("down")


async def _succeed(breaker: CircuitBreaker) -> None:
    async with breaker.call():
        pass


async def _refused(enhancer: OllamaEnhancer, match: str | None = None) -> None:
    """One prompt that Ollama, or the circuit, refuses."""
    with pytest.raises(DependencyUnavailable, match=match):
        await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=family_for("tiny"))


async def _half_open() -> CircuitBreaker:
    """A breaker opened by one failure, its cooldown just over: the next call is the probe."""
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=1, cooldown=5, clock=clock)
    await _fail(breaker)
    clock.now += 5
    assert breaker.state == "half_open"
    return breaker


async def test_opens_after_the_threshold_and_refuses_until_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=3, cooldown=30, clock=clock)
    await _fail(breaker)
    await _fail(breaker)
    assert breaker.state == "closed"
    await _fail(breaker)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        await _succeed(breaker)
    clock.now += 29.9
    assert breaker.state == "open"
    clock.now += 0.1
    assert breaker.state == "half_open"


async def test_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker("dep", threshold=2, cooldown=30, clock=Clock())
    await _fail(breaker)
    await _succeed(breaker)
    await _fail(breaker)
    assert breaker.state == "closed"


async def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker = await _half_open()
    probing, release = asyncio.Event(), asyncio.Event()

    async def probe() -> None:
        async with breaker.call():
            probing.set()
            await release.wait()

    task = asyncio.ensure_future(probe())
    await probing.wait()
    with pytest.raises(CircuitOpen, match="half-open"):
        await _succeed(breaker)  # a second caller while the probe is in flight
    release.set()
    await task
    assert breaker.state == "closed"


async def test_a_failed_probe_opens_it_again_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=3, cooldown=5, clock=clock)
    for _ in range(3):
        await _fail(breaker)
    clock.now += 5
    await _fail(breaker)  # the probe
    assert breaker.state == "open"
    clock.now += 4.9
    assert breaker.state == "open"


async def test_a_cancelled_probe_frees_the_slot_without_counting() -> None:
    breaker = await _half_open()

    async def hang() -> None:
        async with breaker.call():
            await asyncio.Event().wait()

    task = asyncio.ensure_future(hang())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "half_open"
    await _succeed(breaker)
    assert breaker.state == "closed"


async def test_zero_threshold_never_opens() -> None:
    breaker = CircuitBreaker("dep", threshold=0, cooldown=5, clock=Clock())
    for _ in range(10):
        await _fail(breaker)
    assert breaker.state == "closed"


async def test_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker("ollama", threshold=1, cooldown=5, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        await _fail(breaker)
    assert "circuit ollama: closed -> open" in caplog.text


async def test_each_transition_is_logged_with_its_own_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Opening is a warning; the probe and the recovery, the course after it, are INFO."""
    clock = Clock()
    breaker = CircuitBreaker("ollama", threshold=2, cooldown=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="imagegen.enhance"):
        await _fail(breaker)
        await _fail(breaker)
        clock.now += 5
        await _fail(breaker)  # the probe
        clock.now += 5
        await _succeed(breaker)  # the next probe
        breaker.trip("Ollama did not answer the warm-up")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "circuit ollama: closed -> open (2 consecutive failures)"),
        ("INFO", "circuit ollama: open -> half_open (cool-down of 5s over)"),
        ("WARNING", "circuit ollama: half_open -> open (the probe failed)"),
        ("INFO", "circuit ollama: open -> half_open (cool-down of 5s over)"),
        ("INFO", "circuit ollama: half_open -> closed (the probe succeeded)"),
        ("WARNING", "circuit ollama: closed -> open (Ollama did not answer the warm-up)"),
    ]


async def test_ollama_down_skips_the_calls_once_open(fake_ollama: FakeOllama) -> None:
    fake_ollama.stop()
    settings = Settings(
        ollama_host=fake_ollama.url,
        ollama_timeout=0.5,
        ollama_retries=1,
        ollama_breaker_threshold=2,
        ollama_breaker_cooldown=60,
    )
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    for _ in range(2):
        await _refused(enhancer, "Connect")
    fake_ollama.start()  # back, but the circuit stays open for its cooldown
    await _refused(enhancer, "circuit open")
    assert fake_ollama.chat_requests == []
    await enhancer.aclose()


async def test_open_circuit_falls_back_to_the_template_at_once(
    fake_ollama: FakeOllama, make_stage: MakeStage
) -> None:
    stage = make_stage(ollama_breaker_threshold=1)
    fake_ollama.stop()
    request = GenerationRequest(prompt="a fox", model="tiny")
    first = await stage.run(request, generation_id="g1")
    fake_ollama.start()
    second = await stage.run(request, generation_id="g2")
    assert (first.enhancer, second.enhancer) == ("template", "template")
    assert second.fallback and fake_ollama.chat_requests == []


async def test_only_the_half_open_call_is_the_probe() -> None:
    breaker = await _half_open()
    async with breaker.call() as probe:
        assert probe is True
    assert breaker.state == "closed"
    async with breaker.call() as probe:
        assert probe is False


async def test_a_trip_opens_it_for_a_full_cooldown_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=3, cooldown=5, clock=clock)
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        breaker.trip("not answering at start-up")
    assert "circuit dep: closed -> open (not answering at start-up)" in caplog.text
    with pytest.raises(CircuitOpen):
        await _succeed(breaker)
    clock.now += 4.9
    assert breaker.state == "open"
    clock.now += 0.1
    await _succeed(breaker)  # the probe: Ollama is back
    assert breaker.state == "closed"
    never = CircuitBreaker("dep", threshold=0, cooldown=5, clock=clock)
    never.trip("down")
    assert never.state == "closed", "a threshold of 0 never opens it"


async def test_a_trip_of_an_open_circuit_does_not_extend_its_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=3, cooldown=5, clock=clock)
    breaker.trip("not answering at start-up")
    clock.now += 4
    breaker.trip("still not answering")  # already open: the cool-down runs from the first
    clock.now += 1
    assert breaker.state == "half_open"
    await _succeed(breaker)  # the probe goes through on the first trip's schedule
    assert breaker.state == "closed"


def test_a_trip_after_the_cooldown_opens_the_circuit_again() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=3, cooldown=5, clock=clock)
    breaker.trip("not answering at start-up")
    clock.now += 6  # over, though nothing has read the state since
    breaker.trip("still not answering")
    clock.now += 1
    assert breaker.state == "open", "a full cool-down from the second trip"


async def test_the_probe_is_one_attempt(fake_ollama: FakeOllama) -> None:
    """Retries are for an Ollama that was up; the probe only asks whether it is back."""
    fake_ollama.answer(http_error(500))
    settings = Settings(ollama_host=fake_ollama.url, ollama_retries=2, ollama_breaker_threshold=1)
    enhancer = OllamaEnhancer(settings, backoff=0.01)
    clock = Clock()
    enhancer.breaker = CircuitBreaker("ollama", threshold=1, cooldown=5, clock=clock)
    await _refused(enhancer)
    assert len(fake_ollama.chat_requests) == 3, "closed: the attempt and its two retries"
    clock.now += 5
    await _refused(enhancer)
    assert len(fake_ollama.chat_requests) == 4, "the probe: one attempt"
    assert enhancer.breaker.state == "open"
    await enhancer.aclose()


async def test_ollama_down_at_the_warm_up_opens_the_circuit(
    fake_ollama: FakeOllama, make_stage: MakeStage
) -> None:
    stage = make_stage(ollama_breaker_threshold=3)
    fake_ollama.stop()
    await stage.warm_up()
    fake_ollama.start()  # back: the circuit stays open for its cool-down
    job = await stage.run(GenerationRequest(prompt="a fox", model="tiny"), generation_id="g1")
    assert job.enhancer == "template" and job.fallback
    assert fake_ollama.chat_requests == [], "answered at once, no attempt to wait for"


async def test_a_refusal_says_when_the_probe_may_go() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=1, cooldown=30, clock=clock)
    await _fail(breaker)
    clock.now += 12.5
    with pytest.raises(CircuitOpen) as refused:
        await _succeed(breaker)
    assert refused.value.retry_after == pytest.approx(17.5)
    clock.now += 17.5  # half-open: its probe in flight, the others wait a moment
    async with breaker.call():
        with pytest.raises(CircuitOpen) as refused:
            await _succeed(breaker)
        assert refused.value.retry_after == 1.0


async def test_without_fallback_an_open_circuit_is_a_503_until_the_probe(
    fake_ollama: FakeOllama, make_stage: MakeStage
) -> None:
    """Retry-After is the rest of the cool-down, never a constant: a client (or Knative with
    retryAfterMax) comes back when a prompt can reach Ollama again."""
    stage = make_stage(enhance_fallback=False, ollama_breaker_cooldown=30)
    fake_ollama.stop()
    await stage.warm_up()  # Ollama not answering: the circuit opens
    with pytest.raises(DependencyUnavailable) as refused:
        await stage.run(GenerationRequest(prompt="a fox", model="tiny"), generation_id="g1")
    assert refused.value.status == 503 and "circuit open" in refused.value.message
    assert 28 <= refused.value.retry_after <= 30


class Held:
    """A call of ``breaker`` begun now and held until :meth:`end`; ``outcome`` is its task."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._release = asyncio.Event()
        self._error: Exception | None = None
        self._started = asyncio.Event()
        self.outcome = asyncio.ensure_future(self._call(breaker))

    async def _call(self, breaker: CircuitBreaker) -> None:
        async with breaker.call():
            self._started.set()
            await self._release.wait()
            if self._error is not None:
                raise self._error

    @classmethod
    async def begin(cls, breaker: CircuitBreaker) -> Held:
        held = cls(breaker)
        await held._started.wait()
        return held

    async def end(self, error: Exception | None = None) -> None:
        """End the call: a success, or a failure raising ``error``."""
        self._error = error
        self._release.set()
        await asyncio.gather(self.outcome, return_exceptions=True)


async def test_a_call_begun_before_the_circuit_opened_does_not_close_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It answered for the dependency as it was before it failed: no probe has run, and the
    circuit stays open for its cool-down."""
    breaker = CircuitBreaker("dep", threshold=1, cooldown=5, clock=Clock())
    earlier = await Held.begin(breaker)
    with caplog.at_level(logging.WARNING, logger="imagegen.enhance"):
        await _fail(breaker)  # opens it
        await earlier.end()  # ... then the earlier call succeeds
    assert breaker.state == "open"
    assert [r.getMessage() for r in caplog.records] == [
        "circuit dep: closed -> open (1 consecutive failures)"
    ]


async def test_a_call_begun_before_the_circuit_opened_does_not_decide_the_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", threshold=2, cooldown=5, clock=clock)
    earlier = await Held.begin(breaker)
    await _fail(breaker)
    await _fail(breaker)  # opens it
    clock.now += 5
    probe = await Held.begin(breaker)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="imagegen.enhance"):
        await earlier.end(RuntimeError("down"))  # fails while the probe is in flight
        assert breaker.state == "half_open", "the probe has not failed"
        await probe.end()
    assert breaker.state == "closed"
    assert [r.getMessage() for r in caplog.records] == [
        "circuit dep: half_open -> closed (the probe succeeded)"
    ]
    await _fail(breaker)  # the first failure since it closed: the earlier one does not count
    assert breaker.state == "closed"


class Refused(Exception):
    """An error the dependency answered with: no sign of its health (``exclude``)."""


async def test_an_excluded_error_counts_as_a_success() -> None:
    """As pybreaker's ``exclude``: the count starts again, and a probe so ended closes it."""
    clock = Clock()
    breaker = CircuitBreaker(
        "dep", threshold=2, cooldown=5, clock=clock, exclude=lambda e: isinstance(e, Refused)
    )
    for _ in range(3):
        await _fail(breaker)
        await _fail(breaker)  # opens it
        clock.now += 5
        with pytest.raises(Refused):
            async with breaker.call() as probe:
                raise Refused("no")
        assert probe is True
        assert breaker.state == "closed", "the probe was answered"
    await _fail(breaker)
    with pytest.raises(Refused):
        async with breaker.call():
            raise Refused("no")
    await _fail(breaker)
    assert breaker.state == "closed", "the refusal between two failures reset the count"


REFUSAL = {"prompt": "I'm sorry, but I can't help with creating that image."}


def _enhancer(fake: FakeOllama) -> OllamaEnhancer:
    """Opens its circuit at the first failure, for 0.2 s."""
    settings = Settings(
        ollama_host=fake.url,
        ollama_timeout=0.5,
        ollama_retries=1,
        ollama_breaker_threshold=1,
        ollama_breaker_cooldown=0.2,
    )
    return OllamaEnhancer(settings, backoff=0.01)


@pytest.mark.parametrize(
    "behaviour",
    [reply(REFUSAL), reply({"prompt": "..."}), not_json(), reply({"prompt": "一只红狐狸睡在雪中"})],
    ids=["refusal", "no-words", "not-json", "not-english"],
)
async def test_a_malformed_reply_is_no_failure_of_ollama(
    fake_ollama: FakeOllama, behaviour: Behaviour
) -> None:
    """Three refused prompts opened the circuit for every caller, Ollama healthy: a reply
    that holds no usable prompt falls back for its own request only."""
    enhancer = _enhancer(fake_ollama)
    fake_ollama.answer(behaviour)
    for _ in range(3):
        await _refused(enhancer, "MalformedReply")
    assert enhancer.breaker.state == "closed"
    fake_ollama.answer(reply())
    spec = family_for("tiny")
    assert await enhancer.write(prompt="a fox", contributions=[], seed=1, spec=spec)
    await enhancer.aclose()


async def test_a_malformed_reply_to_the_probe_closes_the_circuit(fake_ollama: FakeOllama) -> None:
    enhancer = _enhancer(fake_ollama)
    fake_ollama.answer(http_error(503))
    await _refused(enhancer, "503")
    assert enhancer.breaker.state == "open"
    await asyncio.sleep(0.2)
    assert enhancer.breaker.state == "half_open"
    fake_ollama.answer(reply(REFUSAL))
    await _refused(enhancer, "a refusal")  # the probe: Ollama is back, the model refused
    assert enhancer.breaker.state == "closed"
    await enhancer.aclose()


@pytest.mark.parametrize(
    "behaviour",
    [
        Behaviour(body=b"[1]"),  # a 200 that is no chat response: unreadable
        http_error(404, "model 'llama3.2' not found"),  # every prompt fails alike
        http_error(400, "invalid options"),
        http_error(429, "busy"),
    ],
    ids=["unreadable", "404", "400", "429"],
)
async def test_an_unreadable_body_or_an_error_status_is_a_failure(
    fake_ollama: FakeOllama, behaviour: Behaviour
) -> None:
    enhancer = _enhancer(fake_ollama)
    fake_ollama.answer(behaviour)
    await _refused(enhancer)
    assert enhancer.breaker.state == "open"
    await enhancer.aclose()
