"""A plugin that raises what is no Exception, through the served enhance function: skipped,
and the process goes on serving; one that ends the event loop turns the process unready."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes.ollama_server import FakeOllama
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.plugins.sample_plugins import install_distribution

Serve = Callable[[str], InProcessFunction]

_ENTRY_POINTS = {
    "exiting": "tests.plugins.sample_plugins:exiting",
    "interrupting": "tests.plugins.sample_plugins:interrupting",
    "cancelling": "tests.plugins.sample_plugins:cancelling",
    "exiting_on_its_thread": "tests.plugins.sample_plugins:exiting_on_its_thread",
    "loop_stopping": "tests.plugins.sample_plugins:LoopStopping",
    "closing": "tests.plugins.sample_plugins:closing",
    "exiting_in_its_task": "tests.plugins.sample_plugins:exiting_in_its_task",
    "interrupting_in_its_task": "tests.plugins.sample_plugins:interrupting_in_its_task",
}


def _closed(marker: Path) -> None:
    """Wait for the plugin ``closing`` to say it was closed, in ``marker``."""
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)  # written by the loop's thread as it releases the service
    assert marker.read_text() == "closing\n"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The lines said at ERROR or above, the first only of each: the one that the loop ended,
    and no "Exception in callback" of a request's answer set twice as the loop is released."""
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return [line.split("; ")[0] for line in said]


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    """``serve("a,b")``: the enhance function, in this process, with plugins ``a,b`` enabled
    (installed as a third-party package declares them) and a fake Ollama writing prompts."""
    install_distribution(tmp_path / "site", "raising-plugins", _ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    functions: list[InProcessFunction] = []
    with FakeOllama() as fake:
        fake.reply_with({"prompt": "a calm lake at dawn, mist over the water"})

        def start(plugins: str) -> InProcessFunction:
            env = {
                **base_env(tmp_path / "store"),
                "IMAGEGEN_OLLAMA_HOST": fake.url,
                "IMAGEGEN_PLUGINS": plugins,
            }
            function = InProcessFunction("enhance", env, timeout=30)
            functions.append(function)
            return function

        yield start
        for function in functions:
            function.close()


@pytest.mark.parametrize(
    "plugin",
    [
        "exiting",
        "interrupting",
        "cancelling",
        "exiting_on_its_thread",
        "exiting_in_its_task",
        "interrupting_in_its_task",
    ],
)
def test_a_plugin_raising_what_is_no_exception_is_skipped(serve: Serve, plugin: str) -> None:
    enhance = serve(f"{plugin},time_of_day")

    for seed in (1, 2):  # the first request, and the next: the process still serves
        answer = enhance.post("/", json={"prompt": "a calm lake", "seed": seed})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert [c["plugin"] for c in body["contributions"]] == ["time_of_day"]
        assert body["enhancer"].startswith("ollama:") and not body["fallback"]
    assert enhance.get("/readyz").status_code == 200


def test_a_process_whose_event_loop_ended_is_unready_and_answers_at_once(
    serve: Serve, function_caplog: pytest.LogCaptureFixture
) -> None:
    enhance = serve("loop_stopping")

    started = time.monotonic()
    answer = enhance.post("/", json={"prompt": "a calm lake", "seed": 1})
    assert answer.status_code == 503, answer.text
    assert "event loop ended" in answer.json()["message"]
    again = enhance.post("/", json={"prompt": "a calm lake", "seed": 2})
    assert again.status_code == 503
    assert time.monotonic() - started < 10  # not the stage's timeout, request after request
    ready = enhance.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "event loop ended"
    assert enhance.get("/healthz").status_code == 503  # only a restart brings it back
    said = [r for r in function_caplog.records if r.getMessage().startswith("the event loop")]
    assert len(said) == 1, said  # once, however many requests it fails
    [ended] = said
    assert ended.getMessage().startswith("the event loop ended (SystemExit: ")
    assert (ended.levelname, getattr(ended, "stage", None)) == ("CRITICAL", "enhance")


def test_a_process_whose_event_loop_ended_releases_what_its_service_holds(
    serve: Serve,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    function_caplog: pytest.LogCaptureFixture,
) -> None:
    """Its exit's close skips a loop that ended: the service is closed as the loop ends, its
    plugins (and its Ollama client) with it, not left open until the process is killed."""
    marker = tmp_path / "closed"
    monkeypatch.setenv("CLOSED_MARKER", str(marker))
    monkeypatch.setenv("CANCELLED_MARKER", str(tmp_path / "cancelled"))
    enhance = serve("loop_stopping,closing")

    answer = enhance.post("/", json={"prompt": "a calm lake", "seed": 1})
    assert answer.status_code == 503, answer.text
    _closed(marker)
    # The task the loop left (the plugin's, its request failed already) cancelled first.
    assert (tmp_path / "cancelled").read_text() == "cancelled\n"
    assert enhance.get("/readyz").json()["status"] == "event loop ended"
    again = enhance.post("/", json={"prompt": "a calm lake", "seed": 2})
    assert again.status_code == 503 and "event loop ended" in again.json()["message"]
    assert _errors(function_caplog) == [
        "the event loop ended (SystemExit: a plugin's callback exited)"
    ]


def test_work_handed_over_as_the_loop_ends_is_not_run(
    serve: Serve,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    function_caplog: pytest.LogCaptureFixture,
) -> None:
    """A request handed over as the loop ends is failed with the 503 of a loop that ended, and
    its work is not run when the loop runs once more to release the service."""
    marker = tmp_path / "closed"
    monkeypatch.setenv("CLOSED_MARKER", str(marker))
    enhance = serve("closing")
    served = enhance.post("/", json={"prompt": "a calm lake", "seed": 1})
    assert served.status_code == 200, served.text  # its plugins made, to be closed
    [function] = enhance._mine
    gate = threading.Event()

    def hold_then_exit() -> None:
        gate.wait(10)
        raise SystemExit("the loop ends")

    function._loop.call_soon_threadsafe(hold_then_exit)
    ran: list[str] = []
    failed: list[BaseException] = []

    async def work() -> None:
        ran.append("the work")

    def request() -> None:
        try:
            function._run(work())
        except BaseException as exc:
            failed.append(exc)

    handed = threading.Thread(target=request)
    handed.start()
    deadline = time.monotonic() + 10
    while not function._waiting and time.monotonic() < deadline:
        time.sleep(0.005)  # until the work waits on the loop, behind hold_then_exit
    gate.set()
    handed.join(10)
    _closed(marker)  # the loop has run what was handed over, then closed the service
    assert len(failed) == 1 and "event loop ended" in str(failed[0])
    assert ran == []
    assert _errors(function_caplog) == ["the event loop ended (SystemExit: the loop ends)"]
