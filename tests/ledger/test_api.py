"""The ledger function's HTTP API, served in this process, on both backends."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from imagegen.auth.api_keys import hash_api_key
from imagegen.events import GENERATION_REQUESTED, MODEL_ATTRIBUTE, PROMPT_ENHANCED, dataschema
from imagegen.ledger import LedgerEvent, open_ledger
from imagegen.models import GenerationRequest
from imagegen.openapi import document
from imagegen.stages import get as get_stage
from tests.fakes.loopback import broker_ingress
from tests.functions.clients import InProcessFunction
from tests.ledger.chain import T0, binary, chain


def _record(function: InProcessFunction, gid: str, *names: str, **options: Any) -> None:
    events = chain(gid, **options)
    for name in names or ("requested", "enhanced", "rendered", "persisted"):
        assert function.post("/", **binary(events[name])).status_code == 202


def test_one_generation_with_its_timeline_durations_and_urls(function: InProcessFunction) -> None:
    _record(function, "gen-a")
    reply = function.get("/generations/gen-a")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "persisted" and body["error"] is None
    # chain(): requested at +0 s, enhanced +1 s, rendered +4 s, persisted +6 s.
    assert body["durations"] == {"enhance": 1.0, "render": 3.0, "persist": 2.0, "total": 6.0}
    assert [e["seconds_since_previous"] for e in body["timeline"]] == [None, 1.0, 3.0, 2.0]
    assert body["urls"]["image"] == body["url"] == "https://images.example/2026/06/01/gen-a.png"


def test_a_failed_generation_names_its_stage_and_error(function: InProcessFunction) -> None:
    _record(function, "gen-f", "requested", "enhanced", "failed")
    body = function.get("/generations/gen-f").json()
    assert body["status"] == "failed" and body["failed_stage"] == "render"
    assert body["error"]["message"] == "out of memory"


def test_an_unknown_generation_is_404(function: InProcessFunction) -> None:
    reply = function.get("/generations/nope")
    assert reply.status_code == 404
    assert reply.json()["error"] == "not_found" and "nope" in reply.json()["message"]
    assert function.post("/generations/nope/replay").status_code == 404


def test_a_path_parameter_is_percent_decoded_once(function: InProcessFunction) -> None:
    """RFC 3986, section 2.4: the server decodes the path; the route does not again, so
    ``%252e%252e`` is the id ``%2e%2e``, never ``..``."""
    _record(function, "gen-d")
    assert function.get("/generations/gen%2Dd").status_code == 200  # decoded once: gen-d
    twice = function.get("/generations/gen%252Dd")
    assert twice.status_code == 404, twice.text
    assert "gen%2Dd" in twice.json()["message"]
    dots = function.get("/generations/%252e%252e")
    assert dots.status_code == 404 and "%2e%2e" in dots.json()["message"]


def test_history_is_newest_first_in_keyset_pages_with_filters(function: InProcessFunction) -> None:
    for n in range(5):
        model = "big" if n % 2 else "tiny"
        _record(function, f"gen-{n}", start=T0 + timedelta(minutes=n), model=model)
    _record(function, "gen-x", "requested", start=T0 + timedelta(minutes=9))
    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = function.client.get("/generations", params=query).json()
        seen += [g["generation_id"] for g in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == ["gen-x", "gen-4", "gen-3", "gen-2", "gen-1", "gen-0"]

    def ids(**query: str) -> list[str]:
        reply = function.client.get("/generations", params=query)
        assert reply.status_code == 200, reply.text
        return [g["generation_id"] for g in reply.json()["items"]]

    assert ids(status="requested") == ["gen-x"]
    assert ids(model="big") == ["gen-3", "gen-1"]
    since, until = (T0 + timedelta(minutes=1)).isoformat(), (T0 + timedelta(minutes=3)).isoformat()
    assert ids(since=since, until=until) == ["gen-2", "gen-1"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"status": "lost"}, "status"),
        ({"since": "yesterday-ish"}, "since"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": ""}, "cursor"),
        ({"model": ""}, "model"),  # never a filter nothing matches
        ({"since": ""}, "since"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_bad_query_parameter_is_a_400_naming_it(
    function: InProcessFunction, query: dict[str, str], field: str
) -> None:
    reply = function.client.get("/generations", params=query)
    assert reply.status_code == 400, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == [field]


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize(
    "value",
    [
        "2026-06-01",  # a date alone
        "2026-06-01T12:00:00",  # no offset
        "2026-06-01 12:00:00Z",  # a space for the T
        "1780315200",  # a number of seconds
        "2026-06-01T12:00Z",  # no seconds
        "2026-06-01T12:00:00+05:30:15",  # an offset with seconds
        "2026-06-01T12:34:60Z",  # a leap second other than 23:59:60 UTC
        "1970-01-01T00:30:00+01:00",  # 1969 in UTC
    ],
)
def test_a_time_bound_is_an_rfc_3339_timestamp_as_an_events_time_is(
    function: InProcessFunction, field: str, value: str
) -> None:
    """What the document's ``format: date-time`` says, read by the events' own rule."""
    reply = function.client.get("/generations", params={field: value})
    assert reply.status_code == 400, reply.text
    assert [e["field"] for e in reply.json()["errors"]] == [field]


def test_a_time_bound_takes_every_form_rfc_3339_has(function: InProcessFunction) -> None:
    _record(function, "gen-r", "requested")  # requested at T0, 2026-06-01T12:00:00Z

    def ids(**query: str) -> list[str]:
        reply = function.client.get("/generations", params=query)
        assert reply.status_code == 200, reply.text
        return [g["generation_id"] for g in reply.json()["items"]]

    assert ids(since="2026-06-01t12:00:00z") == ["gen-r"]  # "T" and "Z" in either case
    assert ids(since="2026-06-01T21:00:00+09:00") == ["gen-r"]
    assert ids(since="2026-06-01T12:00:00.000001Z") == []
    assert ids(until="2026-06-01T12:00:00.000001Z") == ["gen-r"]
    assert ids(until="2026-05-31T23:59:60Z") == []  # a leap second, before the next day


def test_a_query_parameter_given_twice_is_a_400_naming_it(function: InProcessFunction) -> None:
    reply = function.client.get("/generations?limit=1&limit=2&status=failed")
    assert reply.status_code == 400, reply.text
    assert reply.json()["errors"] == [{"field": "limit", "message": "given more than once"}]


def test_other_methods_and_paths_are_refused(function: InProcessFunction) -> None:
    refused = function.client.delete("/generations/gen-a")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert function.get("/generations/gen-a/events").status_code == 404


def test_every_get_route_answers_head(function: InProcessFunction) -> None:
    """RFC 9110, section 9.3.2: HEAD is GET without the body, its headers and status alike."""
    for path in ("/generations", "/generations/gen-a", "/generations/absent"):
        got, head = function.get(path), function.client.head(path)
        assert head.status_code == got.status_code, path
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.content == b""


def test_replay_sends_the_recorded_job_to_the_broker_under_a_new_id(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-r")
        reply = function.post("/generations/gen-r/replay")
        assert reply.status_code == 202, reply.text
        accepted = reply.json()
        assert reply.json()["from"] == "enhanced" and accepted["replay_of"] == "gen-r"
        [(headers, data)] = received
        assert headers["ce-type"] == PROMPT_ENHANCED and headers["ce-id"] == accepted["event_id"]
        assert headers["ce-subject"] == data["generation_id"] == accepted["generation_id"]
        assert headers[f"ce-{MODEL_ATTRIBUTE}"] == "tiny"  # render's Triggers route on it
        original = chain("gen-r")["enhanced"].data
        same = ("prompt", "seed", "model", "width", "height", "steps", "guidance")
        assert {k: data[k] for k in same} == {k: original[k] for k in same}
        assert data["replay_of"] == "gen-r" and data["generation_id"] != "gen-r"
        assert "authorization" not in headers  # no token mounted: none sent

        bad = function.client.post("/generations/gen-r/replay", params={"from": "rendered"})
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "from"
        assert len(received) == 1


def test_a_replays_attributes_are_percent_encoded_headers_with_their_schema(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    """HTTP binding, section 3.1.3.2: a space, '"' and '%' in a ce-* header are percent-encoded,
    so the broker reads each attribute as it was (a tracestate member ``x=%41`` stays ``%41``);
    and the replay names its data's schema, as every event does."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    tracestate = "k=v w,x=%41"
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-h")
        reply = function.client.post(
            "/generations/gen-h/replay",
            headers={"traceparent": traceparent, "tracestate": tracestate},
        )
        assert reply.status_code == 202, reply.text
        [(headers, _)] = received
        assert headers["ce-tracestate"] == "k=v%20w,x=%2541"
        assert unquote(headers["ce-tracestate"]) == tracestate  # decoded once, as it was
        assert headers["ce-dataschema"] == dataschema(PROMPT_ENHANCED)


@pytest.mark.parametrize(
    ("broker", "status", "code", "retryable"),
    [
        (403, 503, "not_configured", True),  # a token or an EventPolicy refused: an operator's
        (404, 503, "not_configured", True),  # no such broker: K_SINK
        (400, 500, "internal", False),  # an event the broker cannot read: never a retry
        (429, 503, "dependency_unavailable", True),
        (503, 503, "dependency_unavailable", True),
    ],
)
def test_a_broker_refusing_the_replay_is_said_as_what_it_means(
    serve_ledger: Callable[..., InProcessFunction],
    broker: int,
    status: int,
    code: str,
    retryable: bool,
) -> None:
    with broker_ingress(broker) as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-b")
        reply = function.post("/generations/gen-b/replay")
        assert len(received) == 1
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert (error["error"], error["retryable"]) == (code, retryable)
    assert f"answered {broker}" in error["message"]


def test_a_replay_retried_with_its_idempotency_key_is_the_same_replay(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    """A caller that got no answer (a broker slow to answer, a connection cut) and retries with
    the same Idempotency-Key sends the same event again: its id and generation, which the
    broker's consumers take once. Another key, or none, is another replay."""
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-i")
        send = partial(function.client.post, "/generations/gen-i/replay")
        first = send(headers={"Idempotency-Key": "retry-1"})
        again = send(headers={"Idempotency-Key": "retry-1"})
        other = send(headers={"Idempotency-Key": "retry-2"})
        requested = send(headers={"Idempotency-Key": "retry-1"}, params={"from": "requested"})
        plain = [send(), send()]
        bad = send(headers={"Idempotency-Key": "x" * 256})
    replies = [first, again, other, requested, *plain]
    assert [r.status_code for r in replies] == [202] * 6, [r.text for r in replies]
    assert first.json() == again.json()
    ids = [r.json()["generation_id"] for r in replies]
    assert len(set(ids)) == 5  # the retry alone repeats one
    assert received[0][0]["ce-id"] == received[1][0]["ce-id"]
    assert received[0][1] == received[1][1]  # the same event's data
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "Idempotency-Key"
    assert len(received) == 6


def test_replay_carries_the_token_the_sink_binding_mounts(
    serve_ledger: Callable[..., InProcessFunction], tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink, IMAGEGEN_SINK_TOKEN_FILE=str(token_file))
        _record(function, "gen-t")
        token_file.write_text("first.jwt\n")
        assert function.post("/generations/gen-t/replay").status_code == 202
        token_file.write_text("renewed.jwt")  # Knative renews the Secret before expiry
        assert function.post("/generations/gen-t/replay").status_code == 202
        assert [h["authorization"] for h, _ in received] == [
            "Bearer first.jwt",
            "Bearer renewed.jwt",
        ]


def test_replay_without_a_broker_is_a_503_naming_the_setting(function: InProcessFunction) -> None:
    _record(function, "gen-r")
    reply = function.post("/generations/gen-r/replay")
    assert reply.status_code == 503
    assert [e["field"] for e in reply.json()["errors"]] == ["IMAGEGEN_SINK_URL"]
    assert "set IMAGEGEN_SINK_URL" in reply.json()["message"]


def test_the_api_needs_the_same_credentials_as_post(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    key = "ledger-test-key-0123456789"
    function = serve_ledger(
        IMAGEGEN_AUTH_REQUIRED="true", IMAGEGEN_API_KEY_HASHES=hash_api_key(key)
    )
    for path in ("/generations", "/generations/gen-a"):
        refused = function.get(path)
        assert refused.status_code == 401 and "Bearer" in refused.headers["www-authenticate"]
    assert function.client.post("/generations/gen-a/replay").status_code == 401
    bearer = {"Authorization": f"Bearer {key}"}
    assert function.client.get("/generations", headers=bearer).status_code == 200
    assert function.client.get("/generations/gen-a", headers=bearer).status_code == 404
    assert function.get("/readyz").status_code == 200  # probes stay open


def test_the_served_document_describes_the_routes(function: InProcessFunction) -> None:
    served = function.get("/openapi.json").json()
    assert served == json.loads(json.dumps(document(get_stage("ledger"))))
    listing = served["paths"]["/generations"]["get"]
    names = {p["name"] for p in listing["parameters"]}
    assert names == {"status", "since", "until", "model", "limit", "cursor"}
    detail = served["paths"]["/generations/{generation_id}"]["get"]["responses"]
    assert {"200", "401", "404"} <= set(detail)
    # Every status a route answers is one its document names: an unknown parameter, a 400.
    for path, route in (("/generations/gen-a", "/generations/{generation_id}"),):
        answered = function.get(path + "?x=1")
        assert answered.status_code == 400
        assert str(answered.status_code) in served["paths"][route]["get"]["responses"]
    replay = served["paths"]["/generations/{generation_id}/replay"]["post"]
    assert [p["name"] for p in replay["parameters"]] == ["generation_id", "from", "Idempotency-Key"]
    assert [p["in"] for p in replay["parameters"]] == ["path", "query", "header"]


def _answered_as_documented(served: dict[str, Any], path: str, method: str, reply: Any) -> None:
    """``reply``'s status is one the route's document names, its body the schema it gives."""
    import jsonschema

    documented = served["paths"][path][method]["responses"][str(reply.status_code)]
    schema = documented["content"]["application/json"]["schema"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    jsonschema.validate(reply.json(), served["components"]["schemas"][name])


def _damage(ledger_url: str, sql: str) -> None:
    """A row as another program (or a newer version) might leave it."""
    ledger = open_ledger(ledger_url)
    try:
        with ledger.transaction() as db:
            db.run(sql, {})
    finally:
        ledger.close()


def test_a_record_the_ledger_cannot_read_is_a_documented_500(
    serve_ledger: Callable[..., InProcessFunction], ledger_url: str
) -> None:
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        served = function.get("/openapi.json").json()
        _record(function, "gen-u")
        _damage(ledger_url, "UPDATE generations SET status = 'archived'")  # a newer status
        detail = function.get("/generations/gen-u")
        replay = function.post("/generations/gen-u/replay")
        assert received == []
    for reply in (detail, replay):
        assert reply.status_code == 500, reply.text
        error = reply.json()
        assert (error["error"], error["retryable"]) == ("internal", False)
        assert error["message"].endswith("has an unreadable record (generation gen-u: status)")
    _answered_as_documented(served, "/generations/{generation_id}", "get", detail)
    _answered_as_documented(served, "/generations/{generation_id}/replay", "post", replay)


def test_a_broker_that_cannot_read_the_replay_is_a_documented_500(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    with broker_ingress(400) as (sink, _):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-b")
        reply = function.post("/generations/gen-b/replay")
    assert reply.status_code == 500, reply.text
    served = function.get("/openapi.json").json()
    _answered_as_documented(served, "/generations/{generation_id}/replay", "post", reply)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)  # PostgreSQL's types hold
def test_a_page_whose_last_position_cannot_be_read_is_a_documented_500(
    function: InProcessFunction, ledger_url: str
) -> None:
    for gid in ("gen-1", "gen-2"):
        _record(function, gid, "requested")
    _damage(ledger_url, "UPDATE generations SET listed_at = 'not a time'")
    reply = function.client.get("/generations", params={"limit": 1})
    assert reply.status_code == 500, reply.text
    served = function.get("/openapi.json").json()
    _answered_as_documented(served, "/generations", "get", reply)


@pytest.mark.parametrize(
    "key", ["a", " ", "~" * 255, "x" * 256, "", "tab\tinside", "caf\u00e9", "\x7f", "key-1:2/3"]
)
def test_the_documented_idempotency_key_is_the_one_a_replay_takes(key: str) -> None:
    import re

    from imagegen.errors import InvalidRequest
    from imagegen.ledger.api import _checked_key

    replay = document(get_stage("ledger"))["paths"]["/generations/{generation_id}/replay"]["post"]
    [header] = [p for p in replay["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and not header["required"]
    documented = re.fullmatch(header["schema"]["pattern"].strip("^$"), key) is not None
    try:
        taken = _checked_key(key) == key
    except InvalidRequest:
        taken = False
    assert documented == taken


def test_every_400_a_replay_answers_is_the_one_its_document_describes(
    function: InProcessFunction,
) -> None:
    _record(function, "gen-d")
    served = function.get("/openapi.json").json()
    described = served["paths"]["/generations/{generation_id}/replay"]["post"]["responses"]
    said = described["400"]["description"]
    send = partial(function.client.post, "/generations/gen-d/replay")
    for reply, field in (
        (send(params={"from": "rendered"}), "from"),
        (send(params={"form": "enhanced"}), "form"),
        (send(headers={"Idempotency-Key": "x" * 256}), "Idempotency-Key"),
        (send(headers={"Idempotency-Key": "tab\tinside"}), "Idempotency-Key"),
    ):
        assert reply.status_code == 400, reply.text
        assert [e["field"] for e in reply.json()["errors"]] == [field]
    assert "`from`" in said and "unknown" in said
    assert "`Idempotency-Key`" in said and "1-255 printable ASCII" in said


def test_replay_takes_its_starting_point_by_its_documented_name_alone(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    """`from` is the parameter; the field's name in the code (`start`) is unknown, a 400
    naming it, and nothing is sent."""
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-s")
        send = partial(function.client.post, "/generations/gen-s/replay")
        for query in ({"start": "requested"}, {"start": "requested", "from": "enhanced"}):
            reply = send(params=query)
            assert reply.status_code == 400, reply.text
            assert [e["field"] for e in reply.json()["errors"]] == ["start"]
        assert received == []
        taken = send(params={"from": "requested"})
        assert taken.status_code == 202 and taken.json()["from"] == "requested"
        assert [headers["ce-type"] for headers, _ in received] == [GENERATION_REQUESTED]


def test_a_replay_with_a_body_is_a_400_naming_it_and_nothing_is_sent(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    """`from` is a query parameter: a body saying `{"from": "requested"}` is refused, not
    ignored (a replay from `enhanced` its caller did not ask for)."""
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        _record(function, "gen-y")
        send = partial(function.client.post, "/generations/gen-y/replay")
        for reply in (
            send(json={"from": "requested"}),
            send(params={"from": "requested"}, content=b"{}"),
        ):
            assert reply.status_code == 400, reply.text
            assert [e["field"] for e in reply.json()["errors"]] == ["body"]
            assert "`from` is a query parameter" in reply.json()["message"]
        assert received == []
        empty = send(params={"from": "requested"}, content=b"")
        assert empty.status_code == 202, empty.text
        assert [headers["ce-type"] for headers, _ in received] == [GENERATION_REQUESTED]


def test_replaying_an_invalid_recorded_request_is_a_409_naming_its_fields(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    # The ledger records invalid requests by design (enhance fails them under the same id).
    invalid = LedgerEvent(
        source="/platform/caller",
        id="req-bad",
        type=GENERATION_REQUESTED,
        subject="gen-bad",
        data={"generation_id": "gen-bad", "prompt": "a fox", "width": 7},
    )
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        assert function.post("/", **binary(invalid)).status_code == 202
        assert function.post("/", **binary(chain("gen-bad")["failed"])).status_code == 202
        reply = function.client.post("/generations/gen-bad/replay", params={"from": "requested"})
        assert reply.status_code == 409, reply.text
        body = reply.json()
        assert body["error"] == "not_replayable" and not body["retryable"]
        assert "generation.requested" in body["message"]
        assert [e["field"] for e in body["errors"]] == ["width"]
        assert received == []


def test_a_request_recorded_with_values_in_other_types_is_listed_and_replayed_in_its_own(
    serve_ledger: Callable[..., InProcessFunction],
) -> None:
    # enhance took "1024" as a width before it read types strictly: such a request was served,
    # and its history and replay still read it, sending the values in their own types.
    recorded = LedgerEvent(
        source="/platform/caller",
        id="req-lax",
        type=GENERATION_REQUESTED,
        subject="gen-lax",
        data={"generation_id": "gen-lax", "prompt": "a fox", "width": "512", "seed": "7"},
    )
    with broker_ingress() as (sink, received):
        function = serve_ledger(K_SINK=sink)
        assert function.post("/", **binary(recorded)).status_code == 202
        shown = function.client.get("/generations/gen-lax").json()
        assert (shown["original_prompt"], shown["seed"]) == ("a fox", 7)
        reply = function.client.post("/generations/gen-lax/replay", params={"from": "requested"})
        assert reply.status_code == 202, reply.text
        [(_, data)] = received
        assert (data["width"], data["seed"]) == (512, 7)
        assert GenerationRequest.model_validate(data).width == 512  # as enhance reads it


def test_the_broker_ingress_stand_in_refuses_what_knatives_refuses() -> None:
    """As pkg/broker/ingress/ingress_handler.go: no valid CloudEvent, or a spent TTL, is a 400
    and taken by no one; what the replay tests see sent is what a broker would take.

    The ingress defaults and reduces the TTL before it checks it (pkg/broker/ttl.go,
    ``TTLDefaulter``): none, or one sdk-go's ``ParseInteger`` (``strconv.ParseFloat``) cannot
    read, is 255; any other is one less, so an event that came with 1 is refused.
    """
    import httpx

    event = {"ce-specversion": "1.0", "ce-source": "/t", "ce-type": "t.x"}
    sent = {
        # TTL (None: absent) -> status, as a knative-v1.22.2 ingress answers it
        "0": 400,
        "1": 400,  # 1 - 1
        "-1": 400,
        "-7": 400,
        "1.9": 400,  # int32(1.9) == 1
        "2": 202,
        "3": 202,
        "+3": 202,  # ParseFloat takes a sign
        "3.0": 202,
        "0x1p2": 202,  # a hexadecimal float: 4
        "abc": 202,  # unreadable: 255
        "": 202,
        None: 202,
    }
    with broker_ingress() as (url, received):
        plain = httpx.post(url, json={"a": 1})
        answered = {
            ttl: httpx.post(
                url,
                json={},
                headers={**event, "ce-id": f"ttl-{ttl}"}
                | ({} if ttl is None else {"ce-knativebrokerttl": ttl}),
            ).status_code
            for ttl in sent
        }
        # Go reads no space around a number: " 1" is unreadable, so 255, not 0.
        spaced = httpx.post(
            url,
            content=json.dumps(
                {"specversion": "1.0", "id": "spaced", "source": "/t", "type": "t.x"}
                | {"knativebrokerttl": " 1"}
            ),
            headers={"content-type": "application/cloudevents+json"},
        )
    assert plain.status_code == 400
    assert answered == sent
    assert spaced.status_code == 202
    taken = [headers.get("ce-id") or body["id"] for headers, body in received]
    assert taken == [f"ttl-{ttl}" for ttl, status in sent.items() if status == 202] + ["spaced"]
