"""Invocations need a bearer token when auth is on; probes and the document never do."""

from __future__ import annotations

import base64
import json
import logging
import socket
from pathlib import Path

import httpx
import pytest

from imagegen.auth import Authenticator, Principal, new_api_key
from imagegen.events import GENERATION_REQUESTED
from tests.fakes.oidc_issuer import SUBJECT, Issuer
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import StartServer, auth_env, base_env
from tests.functions.servers import cloudevent_headers

REQUEST = {"prompt": "a red door", "width": 256, "height": 256, "enhance": False}
API_KEY, API_KEY_HASH = new_api_key()


@pytest.fixture(scope="module")
def enhance(issuer: Issuer, tmp_path_factory: pytest.TempPathFactory) -> InProcessFunction:
    env = {
        **base_env(tmp_path_factory.mktemp("auth-store")),
        **auth_env(issuer.url, API_KEY_HASH),
    }
    return InProcessFunction("enhance", env)


def test_probes_and_the_document_stay_open(enhance: InProcessFunction) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert enhance.get(path).status_code == 200, path


def test_no_token_is_401_with_a_challenge(enhance: InProcessFunction) -> None:
    reply = enhance.post("/", json=REQUEST)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="imagegen"'
    assert reply.json()["error"] == "unauthenticated"


def test_a_bad_token_is_401_and_never_logged(
    enhance: InProcessFunction, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    expired = issuer.sign(
        {"exp": 1_000_000, "iat": 999_000, "nbf": 999_000}, audience="imagegen-enhance"
    )
    with caplog.at_level(logging.DEBUG):
        for token in (expired, "igk_not-a-key", expired[:-6] + "AAAAAA"):
            reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
            assert reply.status_code == 401, reply.text
            assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
            assert token not in reply.text
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert expired not in logged and "igk_not-a-key" not in logged


def test_a_token_for_another_function_is_401(enhance: InProcessFunction, issuer: Issuer) -> None:
    token = issuer.sign({}, audience="imagegen-render")
    reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 401
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert "audience 'imagegen-enhance'" in reply.json()["message"]


def test_a_token_of_a_subject_not_admitted_is_403(issuer: Issuer, tmp_path: Path) -> None:
    env = {
        **base_env(tmp_path / "store"),
        **auth_env(issuer.url),
        "IMAGEGEN_AUTH_SUBJECTS": "system:serviceaccount:imagegen:someone-else",
    }
    token = issuer.sign({}, audience="imagegen-enhance")
    reply = InProcessFunction("enhance", env).post(
        "/", json=REQUEST, headers={"Authorization": f"Bearer {token}"}
    )
    assert reply.status_code == 403
    assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]


def test_subjects_one_a_line_admit_each_and_only_those(issuer: Issuer, tmp_path: Path) -> None:
    """As the kubectl command of docs/authentication.md prints them: the list was taken for
    one subject with newlines in it, and the broker itself was refused 403 (never retried)."""
    trigger = "system:serviceaccount:imagegen:imagegen-enhance-oidc"
    env = {
        **base_env(tmp_path / "store"),
        **auth_env(issuer.url),
        "IMAGEGEN_AUTH_SUBJECTS": f"{trigger}\n{SUBJECT}\n",
    }
    enhance = InProcessFunction("enhance", env)
    for subject, status in [(SUBJECT, 200), (trigger, 200), ("system:serviceaccount:x:y", 403)]:
        token = issuer.sign({"sub": subject}, audience="imagegen-enhance")
        reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == status, (subject, reply.text)


def test_subjects_that_name_none_are_a_start_up_failure_not_any_subject(
    issuer: Issuer, tmp_path: Path
) -> None:
    """An empty list admits any subject: a command that printed nothing opened the function to
    every token for its audience, without a word."""
    env = {**base_env(tmp_path / "store"), **auth_env(issuer.url), "IMAGEGEN_AUTH_SUBJECTS": " "}
    enhance = InProcessFunction("enhance", env)
    ready = enhance.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    token = issuer.sign({"sub": "system:serviceaccount:x:y"}, audience="imagegen-enhance")
    reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"] == "not_configured"
    assert "IMAGEGEN_AUTH_SUBJECTS" in reply.json()["message"]


def test_a_token_header_of_the_wrong_types_is_401_not_500(
    enhance: InProcessFunction, issuer: Issuer
) -> None:
    # No signature needed to send one: the answer must be a refusal, never a stack trace.
    header = "eyJhbGciOiJSUzI1NiIsImtpZCI6MX0"  # {"alg":"RS256","kid":1}
    token = ".".join([header, *issuer.sign({}, audience="imagegen-enhance").split(".")[1:]])
    reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"] == "unauthenticated"


def test_an_iat_that_is_no_time_is_401_not_500(enhance: InProcessFunction) -> None:
    # Unsigned, naming no key the issuer has: Python's JSON reads NaN and Infinity. Each is
    # sent twice: the first may fetch the keys, the second finds them just fetched.
    header = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJvZ3VzIn0"  # {"alg":"RS256","kid":"bogus"}
    # Integers of 400 digits, which no float holds, as much as NaN.
    huge = "1" + "0" * 400
    for issued_at in ("NaN", "NaN", "-Infinity", "-Infinity", "Infinity", f"-{huge}", f"-{huge}"):
        claims = base64.urlsafe_b64encode(f'{{"iat": {issued_at}, "sub": "x"}}'.encode())
        token = f"{header}.{claims.decode().rstrip('=')}.AAAA"
        reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401, (issued_at, reply.text)
        assert reply.json()["error"] == "unauthenticated"


def test_an_error_authentication_did_not_foresee_is_a_json_500(
    enhance: InProcessFunction, issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not Flask's HTML page: the same JSON failure as any request's, logged whole.
    def broken(self: Authenticator, authorization: str | None) -> Principal:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(Authenticator, "authenticate", broken)
    token = issuer.sign({}, audience="imagegen-enhance")
    reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 500, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["error"] == "internal"
    assert "OverflowError" not in reply.text


def test_the_brokers_token_and_an_api_key_are_admitted(
    enhance: InProcessFunction, issuer: Issuer
) -> None:
    token = issuer.sign({}, audience="imagegen-enhance")
    for credential in (token, API_KEY):
        reply = enhance.post("/", json=REQUEST, headers={"Authorization": f"Bearer {credential}"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["prompt"]


def test_off_in_dev(tmp_path: Path) -> None:
    dev = InProcessFunction("enhance", base_env(tmp_path / "dev-store"))
    assert dev.post("/", json=REQUEST).status_code == 200


def test_a_function_that_could_not_start_answers_503_before_reading_a_body(
    start_server: StartServer, issuer: Issuer, tmp_path: Path
) -> None:
    """Start-up failed before its gate was built (the key pasted where its hash belongs): no
    request can be authenticated, so none is read either, any more than a refused one."""
    pasted = "igk_pasted_the_key_not_its_hash"
    env = {**base_env(tmp_path / "store"), **auth_env(issuer.url, pasted)}
    enhance = start_server("enhance", env)
    ready = httpx.get(enhance.url + "/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "start-up failed"
    event = {**cloudevent_headers(GENERATION_REQUESTED), "ce-specversion": "0.3"}
    for body, headers in [
        (b"{nope", {"Content-Type": "application/json"}),  # no JSON: a 400 once read
        (b'{"prompt": 5, "width": "wide"}', {"Content-Type": "application/json"}),
        (json.dumps(REQUEST).encode(), event),  # no CloudEvent of a version it reads
        (json.dumps(REQUEST).encode(), {"Content-Type": "application/json"}),
    ]:
        reply = enhance.post("/", content=body, headers=headers)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "not_configured"
        assert "IMAGEGEN_API_KEY_HASHES" in reply.json()["message"]
    # Answered with the body not sent: never waited for, nor read.
    with socket.create_connection(("127.0.0.1", enhance.port), timeout=5) as upload:
        upload.sendall(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n{ "
        )
        assert upload.recv(64).startswith(b"HTTP/1.1 503 ")
    # The probes still answer, unauthenticated as ever.
    assert httpx.get(enhance.url + "/healthz").status_code == 200


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_token_naming_a_key_not_fetched_is_a_503_logged_as_a_warning(
    issuer: Issuer, tmp_path: Path
) -> None:
    # Anyone can send a token naming a made-up key, issued after the keys were fetched: the
    # retryable 503 it gets is the caller's doing, as a 401 is, not one of the function's
    # failures, whose ERROR lines alerts and the runbook start from.
    function = InProcessFunction(
        "enhance", {**base_env(tmp_path / "store"), **auth_env(issuer.url)}
    )
    valid = issuer.sign({}, audience="imagegen-enhance")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "made-up"}).encode())
    made_up = ".".join([header.decode().rstrip("="), *valid.split(".")[1:]])
    assert function.post("/", json=REQUEST, headers={"Authorization": f"Bearer {valid}"})
    # On the functions' logger itself: start-up sets the root logger's handlers anew.
    records, logger = _Records(), logging.getLogger("imagegen.functions")
    logger.addHandler(records)
    try:
        # The keys were just fetched: within the back-off, they are not fetched again.
        reply = function.post("/", json=REQUEST, headers={"Authorization": f"Bearer {made_up}"})
    finally:
        logger.removeHandler(records)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"] == "key_not_fetched"
    [failed] = [r for r in records.records if r.getMessage().startswith("request failed")]
    assert failed.levelno == logging.WARNING
