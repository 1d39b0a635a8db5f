"""A stage's span names its stage and generation while it lasts, and no longer.

A library caller enters :func:`imagegen.telemetry.stage_span` in its own context, not in a
task of its own: what the span set must not outlive it there.
"""

from __future__ import annotations

import contextvars
import json
import logging

import pytest

from imagegen.observability import setup_logging
from imagegen.settings import Settings
from imagegen.telemetry import current_generation, current_stage, stage_span

CARRIER = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}

# Each test runs in a copy of the context: a value it leaves set reaches no other test.


@pytest.mark.parametrize("before", ["none", "render"])
def test_the_stage_and_generation_end_with_the_span(before: str) -> None:
    def run() -> None:
        current_stage.set(before)
        with stage_span("enhance", {"subject": "gen-1"}, CARRIER, event=True):
            assert (current_stage.get(), current_generation.get()) == ("enhance", "gen-1")
        assert (current_stage.get(), current_generation.get()) == (before, None)

    contextvars.copy_context().run(run)


def test_the_stage_ends_with_a_span_that_failed() -> None:
    def run() -> None:
        with pytest.raises(RuntimeError), stage_span("persist", {}, CARRIER, event=True):
            raise RuntimeError("boom")
        assert current_stage.get() == "none"

    contextvars.copy_context().run(run)


def test_a_line_after_the_span_names_the_processs_stage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def run() -> list[dict[str, str]]:
        setup_logging(Settings(), "cli")
        capsys.readouterr()
        with stage_span("enhance", {"subject": "gen-1"}, CARRIER, event=True):
            logging.getLogger("imagegen.test").info("within")
        logging.getLogger("imagegen.test").info("after")
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]

    within, after = contextvars.copy_context().run(run)
    assert (within["stage"], within["generation_id"]) == ("enhance", "gen-1")
    assert after["stage"] == "cli"
    assert "generation_id" not in after
