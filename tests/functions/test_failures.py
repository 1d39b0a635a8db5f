"""Failures: final ones are answered with a generation.failed event, the dead-letter sink
loses nothing, and a misconfigured function answers 503 (retried) rather than refusing good
events."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path

import httpx
import pytest

from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED, IMAGE_RENDERED, PROMPT_ENHANCED
from tests.conftest import isolated_settings
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import StartServer, base_env
from tests.functions.servers import FunctionServer, cloudevent_headers, post_event, serving

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SENT_AT = "2026-11-24T09:00:00Z"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FunctionServer]]:
    """enhance and the dead-letter sink as real servers on one store, shared by this module."""
    store = tmp_path_factory.mktemp("store")
    logs = tmp_path_factory.mktemp("logs")
    env = {**isolated_settings(logs), **base_env(store)}
    with serving(("enhance", "deadletter"), env, log_dir=logs) as servers:
        yield servers


def test_a_final_failure_is_answered_2xx_with_generation_failed(
    served: dict[str, FunctionServer],
) -> None:
    enhance = served["enhance"]
    send = partial(post_event, enhance.url, GENERATION_REQUESTED, {"width": 7}, source="/tests")
    reply = send(event_id="bad-1", time=SENT_AT, traceparent=TRACEPARENT)
    # A 2xx reply is published by the broker, and only a 2xx: the platform hears of the
    # failure once, and the delivery is not retried.
    assert reply.status_code == 200
    assert reply.headers["ce-type"] == GENERATION_FAILED
    assert reply.headers["ce-traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    data = reply.json()
    # No subject was given: the generation id is derived from the request event, as on success.
    assert reply.headers["ce-subject"] == data["generation_id"]
    assert data["error"]["errors"][0]["field"] == "width"
    again = send(event_id="bad-1", time=SENT_AT)
    assert again.headers["ce-id"] == reply.headers["ce-id"]  # a redelivery: the same event
    # The failure's time is the event's, not the clock's: a redelivery answers alike.
    assert again.headers["ce-time"] == reply.headers["ce-time"]
    failed_at = datetime.fromisoformat(data["failed_at"].replace("Z", "+00:00"))
    assert datetime.fromisoformat(reply.headers["ce-time"]) == failed_at
    assert failed_at == datetime.fromisoformat(SENT_AT.replace("Z", "+00:00"))
    other = send(event_id="bad-2")
    assert other.headers["ce-id"] != reply.headers["ce-id"]


def test_two_requests_failing_for_one_generation_are_two_events(
    served: dict[str, FunctionServer],
) -> None:
    """CloudEvents has ``source`` and ``id`` unique per distinct event, and the sinks and the
    ledger keep one event per pair: two different requests naming one generation that both
    fail are two failures, each answered alike at every delivery."""
    enhance = served["enhance"]
    send = partial(post_event, enhance.url, GENERATION_REQUESTED, source="/tests", subject="twice")
    wide = send({"width": 7}, event_id="twice-1", time=SENT_AT)
    high = send({"height": 7}, event_id="twice-2", time=SENT_AT)
    assert wide.headers["ce-type"] == high.headers["ce-type"] == GENERATION_FAILED
    assert wide.headers["ce-subject"] == high.headers["ce-subject"] == "twice"
    assert wide.headers["ce-id"] != high.headers["ce-id"]
    again = send({"width": 7}, event_id="twice-1", time=SENT_AT)
    assert again.headers["ce-id"] == wide.headers["ce-id"]


def test_a_failure_of_an_event_without_a_time_is_answered_alike_and_recorded_once(
    served: dict[str, FunctionServer],
) -> None:
    """No clock in the answer: every delivery of the refused event gets the same event (no
    ``time``, ``failed_at`` null), which the dead-letter sink files once, undated, on any day."""
    enhance, sink = served["enhance"], served["deadletter"]
    send = partial(post_event, enhance.url, GENERATION_REQUESTED, {"width": 17}, source="/tests")
    first, again = send(event_id="untimed-1"), send(event_id="untimed-1")
    assert first.status_code == again.status_code == 200
    assert first.headers["ce-type"] == GENERATION_FAILED
    assert "ce-time" not in first.headers and first.json()["failed_at"] is None
    assert first.content == again.content
    same = ("ce-id", "ce-source", "ce-subject", "ce-type")
    assert [first.headers[h] for h in same] == [again.headers[h] for h in same]
    for reply in (first, again):  # delivered to the sink, as the broker would
        headers = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
        headers["content-type"] = "application/json"
        assert sink.post("/", headers=headers, content=reply.content).status_code == 202
    store = Path(sink.env["IMAGEGEN_STORAGE_URL"])
    gid = first.headers["ce-subject"]
    records = [
        p
        for p in store.rglob("failures/**/*.json")
        if json.loads(p.read_text())["generation_id"] == gid
    ]
    assert [p.parent.name for p in records] == ["undated"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({f"field_{n}": 0 for n in range(40_000)}, "field_0"),  # 40,000 unknown fields
        ({"prompt": "a fox", "é" * 150_000: 1}, "é" * 10),  # 900 KB of JSON: \u00e9 each
    ],
    ids=["many-fields", "a-huge-field-name"],
)
def test_a_refusal_quotes_the_input_in_a_few_kib_at_most(
    served: dict[str, FunctionServer], body: dict[str, object], field: str
) -> None:
    """An answer, a log line and a generation.failed event repeat what was refused: bounded,
    so that a broker can publish the event (Kafka refuses a record over 1 MB) and a log line
    stays a line."""
    enhance = served["enhance"]
    refused = enhance.post(json=body)
    failed = post_event(enhance.url, GENERATION_REQUESTED, body, source="/tests", event_id="big")
    assert refused.status_code == 400 and failed.headers["ce-type"] == GENERATION_FAILED
    for error in (refused.json(), failed.json()["error"]):
        assert error["errors"][0]["field"].startswith(field)
        assert len(error["errors"]) <= 20
    assert len(refused.content) < 16 * 1024 and len(failed.content) < 16 * 1024
    logged = [r for r in enhance.log_records() if r.get("message", "").startswith("request")]
    assert logged and max(len(json.dumps(r)) for r in logged[-2:]) < 16 * 1024


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a fox", "metadata": {"k": "\ud800"}}, "metadata"),
        ({"prompt": "a fox", "metadata": {"\udfff": 1}}, "metadata"),
        (
            {"prompt": "a fox", "plugin_options": {"art_style": {"style": "\ud800"}}},
            "plugin_options",
        ),
    ],
    ids=["metadata-value", "metadata-key", "plugin-option"],
)
def test_a_lone_surrogate_in_free_form_values_is_refused_naming_the_field(
    served: dict[str, FunctionServer], body: dict[str, object], field: str
) -> None:
    """JSON's ``\\ud800`` escape makes a string no UTF-8 can hold: the request is refused (its
    digest, the stored memo and the events are UTF-8), never a 500 retried until dead-lettered."""
    enhance = served["enhance"]
    refused = enhance.post(content=json.dumps(body), headers={"content-type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert [e["field"] for e in refused.json()["errors"]] == [field]
    failed = post_event(enhance.url, GENERATION_REQUESTED, body, source="/tests", event_id="sur")
    assert failed.status_code == 200 and failed.headers["ce-type"] == GENERATION_FAILED


def test_the_server_keeps_serving_after_bad_input(served: dict[str, FunctionServer]) -> None:
    enhance = served["enhance"]
    for _ in range(3):
        garbage = enhance.post(
            content=b"\xff\xfe garbage", headers={"content-type": "application/json"}
        )
        assert garbage.status_code == 400
    assert enhance.get("/healthz").status_code == 200
    fine = enhance.post(json={"prompt": "ok", "width": 256, "height": 256})
    assert fine.status_code == 200
    records = enhance.log_records()
    assert records, "function logs are JSON lines"
    assert all("Traceback" not in json.dumps(r.get("message", "")) for r in records)


def test_retryable_failures_are_errors_not_events(
    start_server: StartServer, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_ENHANCE_FALLBACK": "false"}
    enhance = start_server("enhance", env)
    reply = post_event(enhance.url, GENERATION_REQUESTED, {"prompt": "x"}, subject="retry-1")
    assert reply.status_code == 503
    assert "ce-type" not in reply.headers
    assert reply.json()["retryable"] is True


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"ce-subject": "bad subject!"}, b'{"prompt": "x"}'),
        ({"content-type": "text/plain"}, b"hello"),
        ({}, b"{not json"),
        ({}, b'{"prompt": "' + b"x" * (1024 * 1024 + 100) + b'"}'),
    ],
    ids=["bad-subject", "not-json-type", "bad-json", "too-large"],
)
def test_the_dead_letter_sink_keeps_what_a_stage_refused(
    served: dict[str, FunctionServer], headers: dict[str, str], body: bytes
) -> None:
    deadletter = served["deadletter"]
    store = Path(deadletter.env["IMAGEGEN_STORAGE_URL"])
    before = set(store.rglob("failures/**/*.json"))
    sent = {
        **cloudevent_headers(GENERATION_REQUESTED, source="/tests", knativeerrorcode="400"),
        **headers,
    }
    reply = httpx.post(deadletter.url, headers=sent, content=body, timeout=30)
    assert reply.status_code == 202, reply.text
    assert reply.content == b""  # a 2xx reply is empty or an event: here, empty
    # One record for this delivery, whatever the sink kept before.
    [record] = [json.loads(p.read_text()) for p in set(store.rglob("failures/**/*.json")) - before]
    assert record["event_type"] == GENERATION_REQUESTED and record["error_code"] == "400"
    assert record["data"] is not None


def test_a_misconfigured_function_answers_503_not_400(
    start_server: StartServer, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_STORAGE_URL": "gs://not-supported"}
    enhance = start_server("enhance", env)
    assert httpx.get(enhance.url + "/healthz").status_code == 200
    ready = httpx.get(enhance.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    for _ in range(3):
        reply = post_event(enhance.url, GENERATION_REQUESTED, {"prompt": "fine"}, subject="cfg-1")
        assert reply.status_code == 503, reply.text
        assert "invalid IMAGEGEN_STORAGE_URL: unsupported scheme" in reply.json()["message"]
        assert int(reply.headers["retry-after"]) > 0
    logs = [r for r in enhance.log_records() if r.get("message", "").startswith("start-up failed")]
    assert len(logs) == 1


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"IMAGEGEN_PLUGINS": "time_of_day,nosuchplugin"}, "IMAGEGEN_PLUGINS (unknown plugin"),
        (
            {"IMAGEGEN_REMOTE_CONTEXT_URL": "notaurl"},
            "IMAGEGEN_REMOTE_CONTEXT_URL (not an http:// or https:// URL with a host)",
        ),
        (
            {
                "IMAGEGEN_REMOTE_CONTEXT_URL": "http://127.0.0.1:9/context",
                "IMAGEGEN_REMOTE_CONTEXT_TIMEOUT": "10",
            },
            "IMAGEGEN_REMOTE_CONTEXT_TIMEOUT (10s is not below",
        ),
        (
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"nosuch": {}}'},
            "IMAGEGEN_PLUGIN_OPTIONS (plugin_options.nosuch: no enabled plugin",
        ),
        (
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"stlye": "ukiyo-e"}}'},
            "IMAGEGEN_PLUGIN_OPTIONS (plugin_options.art_style.stlye: unknown option",
        ),
        (
            {"IMAGEGEN_PLUGIN_OPTIONS": '{"art_style": {"style": 5}}'},
            "IMAGEGEN_PLUGIN_OPTIONS (plugin_options.art_style.style: must be text, got 5)",
        ),
    ],
    ids=["unknown-plugin", "url", "timeout", "options-name", "options-key", "options-value"],
)
def test_plugin_settings_that_fail_every_request_fail_start_up(
    start_server: StartServer, tmp_path: Path, env: dict[str, str], said: str
) -> None:
    """The function turned ready, then answered every request 503 naming the setting, with
    only a warning of its warm-up in the log: refused at start-up instead, as any setting
    that cannot work is."""
    enhance = start_server("enhance", {**base_env(tmp_path / "store"), **env})
    ready = httpx.get(enhance.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    reply = enhance.post("/", json={"prompt": "a paper boat"})
    assert reply.status_code == 503 and reply.json()["error"] == "not_configured", reply.text
    assert f"enhance could not start: invalid settings: {said}" in reply.json()["message"]
    lines = [r for r in enhance.log_records() if r["message"].startswith("start-up failed")]
    assert [r["level"] for r in lines] == ["ERROR"], lines
    assert said in lines[0]["message"]
    assert not [r for r in enhance.log_records() if r["message"].startswith("warm-up failed")]


def test_a_misconfigured_function_names_the_variable_that_was_set(tmp_path: Path) -> None:
    # The served models under their former name, as a deployment of before may still set them.
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_ALLOWED_MODELS": '["tiny", 7'}
    with InProcessFunction("enhance", env) as enhance:
        reply = post_event(enhance, GENERATION_REQUESTED, {"prompt": "fine"}, subject="cfg-2")
    assert reply.status_code == 503, reply.text
    message = reply.json()["message"]
    assert message.startswith("enhance could not start: invalid settings: IMAGEGEN_ALLOWED_MODELS")
    assert '["tiny", 7' not in reply.text  # a value is never echoed: it may be a secret


def test_a_misconfigured_function_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reason was in the 503's body alone: a function no request had reached yet logged
    the variable, not what is wrong with it."""
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_TIMEZONE": "Mars/Base"}
    with (
        caplog.at_level(logging.ERROR, logger="imagegen.functions"),
        InProcessFunction("enhance", env) as enhance,
    ):
        assert enhance.get("/readyz").status_code == 503
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up")]
    assert line == (
        "start-up failed: enhance could not start:"
        " invalid settings: IMAGEGEN_TIMEZONE (unknown IANA time zone)"
    )
    assert "Mars" not in caplog.text  # a value is never echoed


def test_the_dead_letter_sink_takes_plain_json_and_keeps_every_attribute(tmp_path: Path) -> None:
    store = tmp_path / "store"
    deadletter = InProcessFunction("deadletter", base_env(store))
    plain = deadletter.post(json={"prompt": "no attributes at all"})
    assert plain.status_code == 202 and plain.content == b""
    again = deadletter.post(json={"prompt": "no attributes at all"})
    assert again.status_code == 202  # the same body: the same record, not a second one
    long_name = "averyveryverylongextensionname"  # past the 20 characters the spec suggests
    event = deadletter.post(
        headers=cloudevent_headers(GENERATION_REQUESTED, **{long_name: "kept"}), content=b"{}"
    )
    assert event.status_code == 202 and event.content == b""
    records = [json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")]
    assert len(records) == 2
    [from_plain] = [r for r in records if r["event_type"] is None]
    assert from_plain["data"] == {"prompt": "no attributes at all"}
    [from_event] = [r for r in records if r["event_type"] == GENERATION_REQUESTED]
    assert from_event["attributes"][long_name] == "kept"
    document = deadletter.get("/openapi.json")
    assert document.status_code == 200
    assert "202" in document.json()["paths"]["/"]["post"]["responses"]


def test_the_dead_letter_sink_keeps_data_with_a_lone_surrogate(tmp_path: Path) -> None:
    # Valid JSON ("\ud800" is an escape JSON allows) that is no Unicode text: pydantic will not
    # write it as UTF-8, and the sink must still keep it, not answer 500 to every redelivery.
    store = tmp_path / "store"
    deadletter = InProcessFunction("deadletter", base_env(store))
    body = b'{"prompt": "a door \\ud800 ajar", "n": 1}'
    reply = deadletter.post(headers={"content-type": "application/json"}, content=body)
    assert reply.status_code == 202 and reply.content == b"", reply.text
    [record] = [json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")]
    assert record["data"] == {"prompt": "a door \ud800 ajar", "n": 1}
    # In the event's id or source too: the record's key is derived from them.
    for attribute in ("id", "source"):
        envelope = {"specversion": "1.0", "type": "t", "source": "/s", "id": "e-1"}
        envelope[attribute] += "\ud800"
        structured = {"content-type": "application/cloudevents+json"}
        reply = deadletter.post(headers=structured, content=json.dumps(envelope).encode())
        assert reply.status_code == 202, reply.text
    assert len(list(store.rglob("failures/**/*.json"))) == 3


def test_the_dead_letter_sink_keeps_one_record_per_event_on_any_day_at_any_replica(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    replicas = [InProcessFunction("deadletter", base_env(store)) for _ in range(2)]
    event = partial(cloudevent_headers, GENERATION_REQUESTED, event_id="dl-1", time=SENT_AT)
    # The broker's first dead-lettering, then a redelivery of it (a later day, another
    # replica, another reason): one record, the first, filed under the event's own day.
    for replica, code in zip(replicas, ("503", "504"), strict=True):
        reply = replica.post(headers=event(knativeerrorcode=code), content=b'{"prompt": "x"}')
        assert reply.status_code == 202, reply.text
    [path] = store.rglob("failures/**/*.json")
    record = json.loads(path.read_text())
    assert path.relative_to(store).parts[:4] == ("failures", "2026", "11", "24")
    assert record["key"] == path.relative_to(store).as_posix()
    assert (record["event_id"], record["error_code"]) == ("dl-1", "503")
    # No usable time: the event names no day, and is still recorded once.
    for replica, when in zip(replicas, ("not a time", "2026-13-45T00:00:00Z"), strict=True):
        undated = event(event_id="dl-2", time=when)
        assert replica.post(headers=undated, content=b"{}").status_code == 202
    [path] = store.rglob("failures/undated/*.json")
    assert json.loads(path.read_text())["attributes"]["time"] == "not a time"


def test_one_event_failing_at_two_subscribers_leaves_a_record_of_each(tmp_path: Path) -> None:
    """render and the ledger both hear ``prompt.enhanced``, and this sink hears
    ``generation.failed`` directly as well as dead-lettered by the ledger's Trigger: each
    failure its own record, each kept once through its redeliveries."""
    store = tmp_path / "store"
    replicas = [InProcessFunction("deadletter", base_env(store)) for _ in range(2)]
    render = "http://imagegen-render.imagegen.svc.cluster.local"
    ledger = "http://imagegen-ledger.imagegen.svc.cluster.local"
    event = partial(cloudevent_headers, PROMPT_ENHANCED, event_id="pe-1", time=SENT_AT)
    failed = partial(cloudevent_headers, GENERATION_FAILED, event_id="gf-1", time=SENT_AT)
    sent = [
        event(knativeerrordest=render, knativeerrorcode="503"),
        event(knativeerrordest=ledger, knativeerrorcode="500"),
        event(knativeerrordest=render, knativeerrorcode="504"),  # a redelivery
        failed(),  # heard directly, then dead-lettered by the ledger's Trigger
        failed(knativeerrordest=ledger, knativeerrorcode="500"),
        failed(knativeerrordest=ledger, knativeerrorcode="502"),  # a redelivery
    ]
    for i, headers in enumerate(sent):
        reply = replicas[i % 2].post(headers=headers, content=b'{"generation_id": "g"}')
        assert reply.status_code == 202, reply.text
    records = [json.loads(p.read_text()) for p in store.rglob("failures/**/*.json")]
    kept = {(r["event_id"], r["error_destination"], r["error_code"]) for r in records}
    assert len(records) == len(kept) == 4
    assert kept == {
        ("gf-1", None, None),
        ("gf-1", ledger, "500"),
        ("pe-1", ledger, "500"),
        ("pe-1", render, "503"),
    }


class _Failures(logging.Handler):
    """How many start-ups have failed, as the functions' log says it."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("start-up failed"):
            self.count += 1
            self.said.append(record.getMessage())


@pytest.fixture
def start_up_failures() -> Iterator[_Failures]:
    # On the functions' logger itself: start-up sets the root logger's handlers anew (and
    # caplog's with them), and its level to whatever the first function started here asked.
    failures, logger = _Failures(), logging.getLogger("imagegen.functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    logger.addHandler(failures)
    try:
        yield failures
    finally:
        logger.removeHandler(failures)
        logger.setLevel(level)


def test_a_function_whose_start_up_failed_starts_again_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_up_failures: _Failures
) -> None:
    """What start-up waited for comes later (a folder made writable, a model pulled): the
    process turns ready without a restart, its start-up begun again after a pause, and again
    after a pause each time it fails again."""
    import sys
    import time

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_STORAGE_URL": str(blocker / "output")}
    persist = InProcessFunction("persist", env)
    adapter = sys.modules["_adapter"]  # functions/_adapter.py, loaded with the function
    monkeypatch.setattr(adapter, "START_AGAIN_SECONDS", 0.2)
    assert persist.get("/readyz").status_code == 503
    assert start_up_failures.count == 1
    time.sleep(0.3)
    assert persist.get("/readyz").status_code == 503  # and start-up is begun again
    # That 503 comes before the second start-up ends: the folder stays unmakeable until it
    # has failed too, so that only a third start-up, begun after another pause, can succeed.
    deadline = time.monotonic() + 10
    while start_up_failures.count < 2:
        assert time.monotonic() < deadline, "start-up was not begun again"
        time.sleep(0.01)
    assert persist.get("/readyz").status_code == 503
    blocker.unlink()  # the folder can be made now
    deadline = time.monotonic() + 10
    while persist.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never started again"
        time.sleep(0.1)
    assert (blocker / "output").is_dir()
    assert start_up_failures.count == 2


def test_a_start_up_that_failed_importing_a_module_is_said_once_and_not_begun_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_up_failures: _Failures
) -> None:
    """A module whose import failed is left half-imported (torch's registries): importing it
    again in the same process fails another way, so the first failure stays the answer, named,
    and the process waits for its restart."""
    import dataclasses
    import importlib
    import sys
    import time
    from concurrent import futures

    import flask

    from imagegen import stages

    (tmp_path / "half_imported.py").write_text(
        "raise FileNotFoundError('No usable temporary directory found')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = 0

    async def start(service: object) -> None:
        nonlocal imports
        imports += 1
        importlib.import_module("half_imported")

    InProcessFunction("persist", base_env(tmp_path / "store")).close()  # loads the adapter
    adapter = sys.modules["_adapter"]
    monkeypatch.setattr(adapter, "START_AGAIN_SECONDS", 0.05)
    for name, value in base_env(tmp_path / "store").items():
        monkeypatch.setenv(name, value)
    function = adapter.Function(dataclasses.replace(stages.get("persist"), start=start))
    try:
        deadline = time.monotonic() + 10
        while function.ready() == (False, "loading"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(5):  # each past the pause after which another start-up would begin
            time.sleep(0.1)
            assert function.ready() == (False, "start-up failed")
        assert imports == 1 and start_up_failures.count == 1
        [said] = start_up_failures.said
        assert "FileNotFoundError: No usable temporary directory found" in said
        assert "raised while importing half_imported" in said and "restart it" in said
        # The liveness probe's failure restarts the container: a new process imports anew.
        assert not function.alive()
        with flask.Flask(__name__).test_request_context("/healthz"):
            probe = function.dispatch(flask.request)
        assert probe.status == 503
        assert json.loads(probe.body) == {"status": "restart needed", "stage": "persist"}
    finally:
        if function in adapter._started:
            adapter._started.remove(function)
        if (closing := function.stop()) is not None:  # as InProcessFunction.close does
            futures.wait([closing], timeout=adapter.CLOSE_SECONDS)
            function.stopped(closing)


def test_a_function_whose_storage_is_not_writable_never_turns_ready(tmp_path: Path) -> None:
    # A directory under a regular file cannot be created, whoever the user (root included).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_STORAGE_URL": str(blocker / "output")}
    persist = InProcessFunction("persist", env)
    ready = persist.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    assert persist.get("/healthz").status_code == 200  # alive: it starts again, no restart
    reply = post_event(persist, IMAGE_RENDERED, {"generation_id": "x"}, subject="unwritable-1")
    assert reply.status_code == 503, reply.text
    # Why, in the answer a dead letter keeps too, not only in the log; never at the probe's
    # path, which answers whoever asks.
    assert "a-file" in reply.json()["message"] and "a-file" not in ready.text
    assert int(reply.headers["retry-after"]) > 0


def test_the_dead_letter_sink_keeps_structured_attributes_as_the_spec_writes_them(
    tmp_path: Path,
) -> None:
    """A structured event's attributes in their canonical strings (``true``, not Python's
    ``True``), its ``data_base64`` decoded, and binary headers percent-decoded, as a stage
    decodes them."""
    store = tmp_path / "store"
    deadletter = InProcessFunction("deadletter", base_env(store))
    data = base64.b64encode(b'{"prompt": "a kite"}').decode()
    structured = {
        "specversion": "1.0",
        "type": GENERATION_REQUESTED,
        "source": "/tests",
        "id": "dl-structured",
        "flag": True,
        "count": 5,
        "data_base64": data,
    }
    reply = deadletter.post(
        headers={"content-type": "application/cloudevents+json"}, json=structured
    )
    assert reply.status_code == 202 and "content-type" not in reply.headers
    binary = cloudevent_headers(GENERATION_REQUESTED, source="/t%C3%A9", event_id="dl-binary")
    assert deadletter.post(headers=binary, content=b"{}").status_code == 202
    records = {
        r["event_id"]: r
        for r in (json.loads(p.read_text()) for p in store.rglob("failures/**/*.json"))
    }
    kept = records["dl-structured"]
    assert (kept["attributes"]["flag"], kept["attributes"]["count"]) == ("true", "5")
    assert kept["data"] == {"prompt": "a kite"}
    assert records["dl-binary"]["attributes"]["source"] == "/té"
