"""What Knative retries, and how long a retried answer asks it to wait.

A final failure of an event is answered 200 with ``generation.failed``; anything Knative would
retry is answered with its status, so that it is retried. Which is which follows Knative's
dispatchers; the ``Retry-After`` of a render at capacity follows docs/rendering.md
("Admission and ``Retry-After``").
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from imagegen.errors import ConfigurationError, Overloaded
from imagegen.events import GENERATION_REQUESTED, PROMPT_ENHANCED, is_final
from tests.conftest import ROOT
from tests.fakes.render_backend import enhanced_prompt
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event


# Knative eventing pkg/kncloudevents/retries.go, SelectiveRetry (v1.22, and main at 8cf4c4b):
# "status codes that are 5XX, 404, 408, 409, 429" are retried; "Do Not Retry 1XX, 2XX, 3XX &
# Most 4XX StatusCode Responses". eventing-kafka-broker's WebClientCloudEventSender
# .isRetryableStatusCode retries the same statuses.
@pytest.mark.parametrize(
    ("status", "final"),
    [
        (404, False),  # a pod becoming ready answers 404
        (408, False),
        (409, False),
        (429, False),
        (500, False),
        (503, False),
        (400, True),
        (422, True),
    ],
)
def test_a_failure_is_final_exactly_where_knative_does_not_retry_it(
    status: int, final: bool
) -> None:
    assert is_final(status) is final


def _job(generation_id: str, *, steps: int = 2) -> dict[str, Any]:
    """A prompt.enhanced event's data for the tiny model."""
    job = enhanced_prompt(generation_id=generation_id, width=256, height=256, steps=steps)
    return job.model_dump(mode="json")


@contextmanager
def _held_render(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], held_id: str
) -> Iterator[tuple[InProcessFunction, threading.Event, threading.Event]]:
    """A render function whose pipeline call for ``held_id`` waits for a release.

    Yields the function, an event set once that call has begun (from then on the job is held,
    and with a queue of 0 every other job is past capacity) and the release (set at the
    latest when the block ends).
    """
    from imagegen.render.diffusers_backend import DiffusersBackend

    rendering, release = threading.Event(), threading.Event()
    denoise_batch = DiffusersBackend.denoise_batch

    def held(self: DiffusersBackend, jobs: Any, **kwargs: Any) -> Any:
        if any(job.generation_id == held_id for job in jobs):
            rendering.set()
            assert release.wait(60)
        return denoise_batch(self, jobs, **kwargs)

    monkeypatch.setattr(DiffusersBackend, "denoise_batch", held)
    with InProcessFunction("render", {**env, "IMAGEGEN_RENDER_QUEUE_SIZE": "0"}) as render:
        try:
            yield render, rendering, release
        finally:
            release.set()


def _refused_at_capacity(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *, first: dict[str, Any] | None = None
) -> Any:
    """The answer to a prompt.enhanced event sent while another job holds the render.

    ``first``, if given, is rendered to the end before (its call is then timed).
    """
    held = _job("held", steps=4)
    with _held_render(monkeypatch, env, "held") as (render, rendering, release):
        if first is not None:
            done = post_event(render, PROMPT_ENHANCED, first, subject=first["generation_id"])
            assert done.status_code == 200, done.text
        with ThreadPoolExecutor(1) as pool:
            holding = pool.submit(post_event, render, PROMPT_ENHANCED, held, subject="held")
            try:
                assert rendering.wait(60), "the held render never started"
                refused = post_event(render, PROMPT_ENHANCED, _job("late"), subject="late")
            finally:
                release.set()  # before the pool waits for the held render
        assert holding.result(timeout=120).status_code == 200
    return refused


def test_an_event_past_capacity_is_answered_429_to_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """429 is retried by Knative: never a final ``generation.failed`` (a 200), which would end
    a generation that only had to wait."""
    refused = _refused_at_capacity(monkeypatch, base_env(tmp_path / "store"))
    assert refused.status_code == 429, refused.text
    assert "ce-type" not in refused.headers
    assert refused.json()["error"] == "overloaded" and refused.json()["retryable"] is True
    assert int(refused.headers["retry-after"]) >= 1


def test_retry_after_before_any_render_is_timed_is_the_running_calls_time_so_far(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/rendering.md: untimed, each call the held jobs need is costed at the running call's
    time so far, kept within a floor and a cap: never the whole render timeout (36.5 s here),
    which a client honouring it would wait for a render that took moments."""
    from imagegen.render.stage import UNTIMED_RETRY_AFTER_CAP, UNTIMED_RETRY_AFTER_FLOOR

    env = {**base_env(tmp_path / "store"), "IMAGEGEN_RENDER_TIMEOUT": "36.5"}
    refused = _refused_at_capacity(monkeypatch, env)
    assert refused.status_code == 429, refused.text
    # The held call had only just begun: the floor, in whole seconds.
    waited = int(refused.headers["retry-after"])
    assert UNTIMED_RETRY_AFTER_FLOOR <= waited < UNTIMED_RETRY_AFTER_CAP
    assert waited <= math.ceil(UNTIMED_RETRY_AFTER_FLOOR) + 1  # allowing a slow second


def test_retry_after_once_timed_is_the_held_jobs_estimates_rounded_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/rendering.md: ``Retry-After = ceil(the held calls' estimates)``; with one call
    timed, a call's time is in proportion to its work (pixels x steps) against that call's."""
    from imagegen.render.batching import Batcher

    observe = Batcher.observe

    def measured(self: Batcher, seconds: float, jobs: Sequence[Any]) -> None:
        # The first call's time fixed (this machine's would vary): 7.25 s a job.
        observe(self, 7.25 * len(jobs), jobs)

    monkeypatch.setattr(Batcher, "observe", measured)
    refused = _refused_at_capacity(
        monkeypatch, base_env(tmp_path / "store"), first=_job("timed", steps=2)
    )
    assert refused.status_code == 429, refused.text
    # The held job has twice the measured one's steps, at the same size: 2 x 7.25 s = 14.5 s.
    assert refused.headers["retry-after"] == "15"


def test_a_misconfigured_function_asks_for_the_configuration_errors_wait(
    tmp_path: Path,
) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_TIMEZONE": "Mars/Base"}
    with InProcessFunction("enhance", env) as enhance:
        reply = post_event(enhance, GENERATION_REQUESTED, {"prompt": "fine"}, subject="cfg-ra")
    assert reply.status_code == 503, reply.text
    assert ConfigurationError.default_retry_after == 30.0
    assert reply.headers["retry-after"] == "30"


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.2, "1"), (4.4, "5"), (16.5, "17"), (17.5, "18"), (30.0, "30")],
)
def test_the_error_reply_says_retry_after_in_whole_seconds_at_least_one(
    monkeypatch: pytest.MonkeyPatch, retry_after: float, header: str
) -> None:
    """RFC 9110, section 10.2.3: ``Retry-After`` is a whole number of seconds, rounded up."""
    monkeypatch.syspath_prepend(str(ROOT / "functions"))
    binding = importlib.import_module("_binding")
    exc = Overloaded("at capacity", retry_after=retry_after)
    reply = binding.error_reply(exc, stage="render", message=None, generation_id=None)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == header
