"""The ledger function, in this process through functions-framework's app, on both backends."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from imagegen.ledger import open_ledger
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import binary as _binary
from tests.ledger.chain import chain


def test_events_posted_by_the_broker_are_recorded_once(
    function: InProcessFunction, ledger_url: str
) -> None:
    events = chain("gen-f")
    for name in ("rendered", "requested", "enhanced", "persisted", "persisted"):
        reply = function.post("/", **_binary(events[name]))
        assert reply.status_code == 202, reply.text
        assert "ce-type" not in reply.headers  # nothing to route on
    ledger = open_ledger(ledger_url)
    try:
        found = ledger.get("gen-f")
        assert found is not None and found.status == "persisted"
        assert len(found.timeline) == 4
    finally:
        ledger.close()


def test_an_event_that_cannot_be_recorded_is_a_final_4xx_not_an_event(
    function: InProcessFunction, ledger_url: str
) -> None:
    # The ledger replies nothing, even to a failure: a generation.failed of its own would
    # report the generation a second time, beside the stage that consumes the same event.
    # A 400 is final for Knative (not retried) and goes to the dead-letter sink.
    event = chain("gen-f")["requested"].model_copy(update={"type": "com.example.other"})
    reply = function.post("/", **_binary(event))
    assert reply.status_code == 400 and "ce-type" not in reply.headers
    assert [e["field"] for e in reply.json()["errors"]] == ["type"]
    bad = chain("gen-f")["enhanced"].model_copy(update={"data": {"generation_id": "gen-f"}})
    reply = function.post("/", **_binary(bad))
    assert reply.status_code == 400 and "ce-type" not in reply.headers
    assert "prompt" in [e["field"] for e in reply.json()["errors"]]
    # Plain JSON without CloudEvents attributes: a 400 that names them.
    reply = function.post("/", json={"generation_id": "gen-f"})
    assert reply.status_code == 400
    assert [e["field"] for e in reply.json()["errors"]] == ["source", "id", "type"]
    ledger = open_ledger(ledger_url)
    try:
        assert ledger.get("gen-f") is None
    finally:
        ledger.close()


def test_the_ledger_is_opened_in_the_background_once_ready(
    function: InProcessFunction, ledger_url: str
) -> None:
    from imagegen.stages import ledger as ledger_stage

    deadline = time.monotonic() + 60
    while not function.get("/readyz").json()["warm"]:
        assert time.monotonic() < deadline, "the warm-up did not end"
        time.sleep(0.02)  # polling the probe
    # Opened (connected, migrated) before any event came.
    assert ledger_url in ledger_stage._opened


def test_opening_the_ledger_never_holds_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A database that keeps the opening waiting (down: up to the pool's timeout) stalls only
    the requests that need it, never the loop every request of the process runs on."""
    import asyncio
    import threading

    import imagegen.ledger
    from imagegen.settings import Settings
    from imagegen.stages import ledger as ledger_stage

    entered, release = threading.Event(), threading.Event()
    real = imagegen.ledger.open_ledger

    def slow_open(url: str | None = None, **options: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real(url, **options)

    monkeypatch.setattr(imagegen.ledger, "open_ledger", slow_open)
    monkeypatch.setattr(ledger_stage, "_opened", {})
    service = SimpleNamespace(settings=Settings(ledger_url=str(tmp_path / "ledger.db")))

    async def run() -> None:
        opening = asyncio.create_task(ledger_stage._ledger(service))  # type: ignore[arg-type]
        assert await asyncio.to_thread(entered.wait, 30)
        await asyncio.sleep(0.05)  # the loop runs other work meanwhile
        assert not opening.done()
        release.set()
        ledger, dispatcher = await opening
        assert dispatcher is None
        assert await ledger_stage._ledger(service) == (ledger, None), "opened once"
        ledger.close()

    asyncio.run(run())


class _Kept(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """Every record of the ``imagegen`` loggers, DEBUG up, while the test runs.

    Kept by a handler on ``imagegen`` itself: the first function a process starts sets up its
    logging, which replaces the root's handlers (caplog's among them)."""
    handler = _Kept()
    imagegen_log = logging.getLogger("imagegen")
    level = imagegen_log.level
    imagegen_log.addHandler(handler)
    imagegen_log.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        imagegen_log.removeHandler(handler)
        imagegen_log.setLevel(level)


@pytest.fixture
def serve_sqlite(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``serve_sqlite(url)``: the ledger function on ``url``; what it opened closed after."""
    from imagegen.stages import ledger as ledger_stage

    monkeypatch.setattr(ledger_stage, "_opened", {})
    monkeypatch.setattr(ledger_stage, "_failed", {})
    served: list[InProcessFunction] = []

    def serve(url: str) -> InProcessFunction:
        served.append(InProcessFunction("ledger", {"IMAGEGEN_LEDGER_URL": url}))
        return served[-1]

    yield serve
    for function in served:
        function.close()
    for opened, _ in ledger_stage._opened.values():
        opened.close()


def test_a_ledger_file_is_opened_before_the_function_says_ready(
    serve_sqlite: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import dataclasses

    from imagegen.stages import ledger as ledger_stage

    # No warm-up to open it meanwhile: what is open at the first 200 was opened by start-up.
    unwarmed = dataclasses.replace(ledger_stage.STAGE, warm_up=None)
    monkeypatch.setattr(ledger_stage, "STAGE", unwarmed)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    function = serve_sqlite(url)
    assert function.get("/readyz").status_code == 200
    assert url in ledger_stage._opened, "ready before the ledger was opened"
    reply = function.post("/", **_binary(chain("gen-s")["requested"]))
    assert reply.status_code == 202, reply.text


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path: path.mkdir(), "is a folder, not a file"),
        (lambda path: path.write_bytes(b"no tables here\n" * 128), "is not a SQLite database"),
    ],
    ids=["folder", "not-sqlite"],
)
def test_a_ledger_file_that_cannot_hold_a_ledger_keeps_the_function_unready(
    serve_sqlite: Any,
    logged: list[logging.LogRecord],
    tmp_path: Path,
    make: Any,
    reason: str,
) -> None:
    path = tmp_path / "ledger.db"
    make(path)
    function = serve_sqlite(str(path))
    ready = function.get("/readyz")
    # Knative never routes to it, and a rollout that set the path keeps the working revision.
    assert ready.status_code == 503
    assert ready.json()["status"] == "start-up failed"  # why: in the log, and a request's 503
    failed = [
        r
        for r in logged
        if (r.name, r.levelno) == ("imagegen.functions", logging.ERROR)
        and r.getMessage().startswith("start-up failed:")
    ]
    assert len(failed) == 1 and reason in failed[0].getMessage()
    assert failed[0].exc_info is None, "its own words, no traceback"
    # An event that comes anyway is retried (503), never refused (a 400 loses it).
    reply = function.post("/", **_binary(chain("gen-u")["requested"]))
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"] == "not_configured"
    # The setting named, never its value (a path here, a password in a database URL).
    assert reply.json()["message"] == f"IMAGEGEN_LEDGER_URL: the ledger file {reason}"
    assert str(path) not in reply.text


def test_a_ledger_url_of_no_backend_is_a_configuration_error(serve_sqlite: Any) -> None:
    function = serve_sqlite("https://ledger.example.com")
    assert function.get("/readyz").status_code == 503
    reply = function.post("/", **_binary(chain("gen-h")["requested"]))
    assert reply.status_code == 503, reply.text
    error = reply.json()
    assert error["error"] == "not_configured"
    assert error["message"].startswith("IMAGEGEN_LEDGER_URL: unsupported ledger URL scheme")
    assert [e["field"] for e in error["errors"]] == ["ledger_url"]


def test_a_database_url_psycopg_cannot_read_is_a_configuration_error_that_hides_it(
    serve_sqlite: Any, logged: list[logging.LogRecord]
) -> None:
    """A generated password with a bare ``%``: libpq's refusal quotes it, so it is not passed on.
    The URL is read at start-up: the function stays unready, and a rollout that set it fails."""
    function = serve_sqlite("postgresql://app:Hunter2%ZZsecret@127.0.0.1:9/imagegen")
    assert function.get("/readyz").status_code == 503  # known without a connection
    replies = [function.post("/", **_binary(chain("gen-p")["requested"])) for _ in range(2)]
    for reply in replies:
        assert reply.status_code == 503, reply.text
        error = reply.json()
        assert error["error"] == "not_configured"
        assert error["message"].startswith("IMAGEGEN_LEDGER_URL: the ledger URL is no PostgreSQL")
        assert [e["field"] for e in error["errors"]] == ["ledger_url"]
    # The log says why, in its own words, as the replies do.
    failed = [r.getMessage() for r in logged if r.getMessage().startswith("start-up failed:")]
    assert len(failed) == 1, [r.getMessage() for r in logged]
    assert "IMAGEGEN_LEDGER_URL: the ledger URL is no PostgreSQL" in failed[0]
    lines = "\n".join(logging.Formatter().format(r) for r in logged)
    assert "Hunter2" not in lines + "".join(reply.text for reply in replies)


def test_a_database_server_is_left_to_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """One down at start-up would keep the process unready after it comes back."""
    import asyncio

    import imagegen.ledger
    from imagegen.settings import Settings
    from imagegen.stages import ledger as ledger_stage

    opened: list[str | None] = []
    monkeypatch.setattr(imagegen.ledger, "open_ledger", lambda url=None, **_: opened.append(url))
    monkeypatch.setattr(ledger_stage, "_opened", {})
    url = "postgresql://imagegen@127.0.0.1:9/imagegen"
    service = SimpleNamespace(settings=Settings(ledger_url=url))
    asyncio.run(ledger_stage.STAGE.start(service))  # type: ignore[misc]
    assert opened == []
    asyncio.run(ledger_stage.STAGE.warm_up(service))  # type: ignore[misc]
    assert opened == [url]


@pytest.fixture(scope="module")
def enhance(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The enhance function in this process (Ollama down: template prompts)."""
    from tests.functions.conftest import base_env

    with InProcessFunction("enhance", base_env(tmp_path_factory.mktemp("store"))) as served:
        yield served


REQUESTS = {
    "its id": ({"generation_id": "gen-a", "prompt": "a fox"}, None),
    "the subject's": ({"prompt": "a fox"}, "gen-b"),
    "none: from source and id": ({"prompt": "a fox"}, None),
    "invalid, its id": ({"generation_id": "gen-c", "width": 5}, None),
    "invalid, the subject's": ({"width": 5}, "gen-d"),
    "an id no generation has": ({"generation_id": "../../x", "prompt": "a fox"}, None),
    "an id too long": ({"generation_id": "a" * 200, "prompt": "a fox"}, None),
    "a subject no generation has": ({"prompt": "a fox"}, "../x"),
    "id and subject disagree": ({"generation_id": "gen-e", "prompt": "a fox"}, "gen-f"),
    "an id of no string": ({"generation_id": 7, "prompt": "a fox"}, "gen-g"),
}


@pytest.mark.parametrize(("data", "subject"), REQUESTS.values(), ids=REQUESTS.keys())
def test_a_request_is_recorded_under_the_generation_enhance_answers_for(
    function: InProcessFunction,
    enhance: InProcessFunction,
    ledger_url: str,
    data: dict[str, Any],
    subject: str | None,
) -> None:
    """Enhance's reply (prompt.enhanced or generation.failed) and the ledger's row name one
    generation, or none at all: never a row of its own, under an id no stage would use."""
    from imagegen.events import GENERATION_REQUESTED
    from imagegen.ledger import LedgerEvent

    request = LedgerEvent(
        source="/platform/caller",
        id="req-1",
        type=GENERATION_REQUESTED,
        subject=subject,
        data=data,
    )
    reply = enhance.post("/", **_binary(request))
    assert reply.status_code == 200, reply.text
    answered = reply.json()["generation_id"]
    assert function.post("/", **_binary(request)).status_code == 202
    ledger = open_ledger(ledger_url)
    try:
        assert [e.generation_id for e in ledger.events()] == [answered]
        rows = [g.generation_id for g in ledger.history().items]
        assert rows == ([answered] if answered else [])
    finally:
        ledger.close()


def test_while_the_database_is_down_one_opening_at_a_time_answers_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests queued behind a failed opening, and those after it, are answered 503 at
    once (each opening waits out the pool's timeout); the next opening comes after
    REOPEN_AFTER seconds."""
    import asyncio

    import imagegen.ledger
    from imagegen.errors import DependencyUnavailable
    from imagegen.settings import Settings
    from imagegen.stages import ledger as ledger_stage

    now = [1000.0]
    opened: list[str | None] = []

    def down(url: str | None = None, **_: Any) -> Any:
        opened.append(url)
        raise DependencyUnavailable("the ledger database is unreachable: refused")

    monkeypatch.setattr(ledger_stage.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(imagegen.ledger, "open_ledger", down)
    monkeypatch.setattr(ledger_stage, "_opened", {})
    monkeypatch.setattr(ledger_stage, "_failed", {})
    service = SimpleNamespace(settings=Settings(ledger_url="postgresql://x@127.0.0.1:9/db"))

    async def requests(count: int) -> list[BaseException | object]:
        calls = [ledger_stage._ledger(service) for _ in range(count)]  # type: ignore[arg-type]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(requests(4))
    assert len(opened) == 1, "one opening for the four"
    assert all(isinstance(a, DependencyUnavailable) and a.retryable for a in answers)
    assert len({id(a) for a in answers}) == 4, "each its own error"
    now[0] += ledger_stage.REOPEN_AFTER - 0.1
    asyncio.run(requests(2))
    assert len(opened) == 1
    now[0] += 0.1
    asyncio.run(requests(1))
    assert len(opened) == 2, "tried again once the time is up"
