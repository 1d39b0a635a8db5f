"""Bearer tokens: Kubernetes-style OIDC tokens against a real JWKS on loopback, and API keys."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from imagegen.auth import Authenticator, SigningKeys, hash_api_key, new_api_key
from imagegen.auth.oidc import KeyNotFetched
from imagegen.errors import DependencyUnavailable, Forbidden, Unauthenticated
from imagegen.settings import Settings
from tests.fakes.oidc_issuer import AUDIENCE, SUBJECT, Issuer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(
    issuer: Issuer, clock: Clock | None = None, wall: Clock | None = None, **settings: Any
) -> Authenticator:
    options: dict[str, Any] = {
        "auth_required": True,
        "oidc_discovery_url": issuer.url,
        "oidc_ca_file": None,
        "oidc_token_file": None,
        **settings,
    }
    configured = Settings(**options)
    keys = SigningKeys(
        issuer.url,
        ttl=configured.oidc_jwks_ttl,
        clock=clock or Clock(),
        wall_clock=wall or time.time,
    )
    return Authenticator(configured, function="render", keys=keys)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Waits for what a fetch in the background does."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.01)


def test_a_valid_token_names_its_subject(issuer: Issuer) -> None:
    principal = gate(issuer).authenticate(bearer(issuer.sign({})))
    assert (principal.kind, principal.subject) == ("oidc", SUBJECT)


def test_an_audience_given_as_a_string_counts(issuer: Issuer) -> None:
    assert gate(issuer).authenticate(bearer(issuer.sign({"aud": AUDIENCE}))).kind == "oidc"


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": -120}, "expired"),
        ({"nbf": 600}, "not valid yet"),
        ({"iat": 600}, "not valid yet"),
        ({"iss": "https://other-cluster.example"}, "another issuer"),
        ({"exp": None}, "'exp'"),
    ],
    ids=["expired", "not-yet-valid", "issued-in-the-future", "wrong-issuer", "no-expiry"],
)
def test_invalid_tokens_are_401(issuer: Issuer, claims: dict[str, Any], message: str) -> None:
    # Times are seconds from now, counted when the test runs: a suite can take longer than them.
    now = int(time.time())
    claims = {
        k: now + v if k in ("exp", "nbf", "iat") and v is not None else v for k, v in claims.items()
    }
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(issuer.sign(claims)))
    assert message in caught.value.message
    assert caught.value.challenge == 'Bearer realm="imagegen", error="invalid_token"'


@pytest.mark.parametrize(
    ("claims", "claim"),
    [
        ({"sub": 5}, "sub"),
        ({"iat": "soon"}, "iat"),
        ({"jti": 5}, "jti"),
        ({"exp": "soon"}, "exp"),
        ({"nbf": "soon"}, "nbf"),
    ],
)
def test_a_signed_claim_pyjwt_refuses_is_named_not_the_signature(
    issuer: Issuer, claims: dict[str, Any], claim: str
) -> None:
    # PyJWT's claim errors (jwt/exceptions.py: InvalidSubjectError, InvalidIssuedAtError,
    # InvalidJTIError; a DecodeError for exp and nbf) are InvalidTokenErrors too, but the
    # signature verified: only InvalidSignatureError says it did not.
    token = issuer.sign(claims)
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.message == f"the token's {claim!r} claim is invalid"
    assert caught.value.challenge == 'Bearer realm="imagegen", error="invalid_token"'
    assert token not in caught.value.message


def test_clock_skew_is_tolerated_within_the_leeway(issuer: Issuer) -> None:
    token = issuer.sign({"exp": int(time.time()) - 20})
    assert gate(issuer, oidc_clock_skew=60).authenticate(bearer(token)).kind == "oidc"
    with pytest.raises(Unauthenticated):
        gate(issuer, oidc_clock_skew=5).authenticate(bearer(token))


def test_another_audience_is_401_as_knative_answers_it(issuer: Issuer) -> None:
    # knative/eventing pkg/auth/verifier.go: go-oidc checks the audience with the signature,
    # and verifyAuthN answers any failure of it 401; only verifyAuthZ (the subject) is a 403.
    token = issuer.sign({"aud": ["imagegen-persist"]})
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.status == 401
    assert caught.value.challenge == 'Bearer realm="imagegen", error="invalid_token"'
    assert "audience 'imagegen-render'" in caught.value.message


def test_subjects_can_be_restricted(issuer: Issuer) -> None:
    with pytest.raises(Forbidden) as caught:
        gate(issuer, auth_subjects="system:serviceaccount:imagegen:someone-else").authenticate(
            bearer(issuer.sign({}))
        )
    assert caught.value.status == 403 and "insufficient_scope" in caught.value.challenge
    # The subject of a verified token, the issuer's words: what to admit, if it should be.
    assert caught.value.message == f"subject {SUBJECT!r} may not invoke this function"
    assert gate(issuer, auth_subjects=SUBJECT).authenticate(bearer(issuer.sign({}))).kind == "oidc"


ALGORITHM_REFUSED = (
    "the token's algorithm is not accepted: only RS256, RS384, RS512, ES256, ES384 or ES512 are"
)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_is_refused(issuer: Issuer) -> None:
    claims = jwt.decode(issuer.sign({}), options={"verify_signature": False})
    token = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{_b64(claims)}."
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.message == ALGORITHM_REFUSED


def test_an_hmac_token_keyed_with_the_public_key_is_refused(issuer: Issuer) -> None:
    # The classic confusion attack: HS256 with the issuer's published key as the secret.
    published = json.dumps(issuer._jwks()["keys"][0]).encode()
    claims = jwt.decode(issuer.sign({}), options={"verify_signature": False})
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'})}.{_b64(claims)}"
    mac = hmac.new(published, signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.message == ALGORITHM_REFUSED


@pytest.mark.parametrize(
    "algorithm",
    ["igk_" + "S" * 40 + "-" * 3000, "RS256 ", "HS256"],
    ids=["a-secret-sent-as-alg", "rs256-and-a-space", "hs256"],
)
def test_a_refused_algorithm_is_not_echoed(issuer: Issuer, algorithm: str) -> None:
    """Anyone can put anything in a token's header, unsigned: the refusal (answered, and
    logged) names the algorithms accepted, never what was sent."""
    claims = jwt.decode(issuer.sign({}), options={"verify_signature": False})
    token = f"{_b64({'alg': algorithm, 'kid': 'k1'})}.{_b64(claims)}.AAAA"
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.message == ALGORITHM_REFUSED
    assert algorithm not in caught.value.message


def test_a_tampered_token_is_refused(issuer: Issuer) -> None:
    header, payload, signature = issuer.sign({}).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(f"{header}.{_b64(claims)}.{signature}"))
    assert "signature" in caught.value.message


def test_a_token_signed_by_an_unpublished_key_is_refused(issuer: Issuer) -> None:
    stranger = Issuer()  # its keys are never served
    stranger.issuer = issuer.issuer
    stranger.add_key("k1", ec.generate_private_key(ec.SECP256R1()))
    token = stranger.sign({}, algorithm="ES256")
    with pytest.raises(Unauthenticated):
        gate(issuer).authenticate(bearer(token))


def test_key_rotation_unknown_kid_refreshes_the_keys_once(issuer: Issuer) -> None:
    clock, wall = Clock(), Clock()
    wall.now = float(int(time.time()))
    authenticator = gate(issuer, clock, wall)
    assert authenticator.authenticate(bearer(issuer.sign({}))).kind == "oidc"
    fetches = len(issuer.requests)

    # Cached: more tokens, no fetch.
    for _ in range(3):
        authenticator.authenticate(bearer(issuer.sign({})))
    assert len(issuer.requests) == fetches

    # The issuer rotates in a new key: an unknown kid is refused until a refresh finds it,
    # and refreshes are rate-limited so made-up kids cannot force a fetch per request.
    # A token issued after the keys were fetched may name one published since: until the
    # back-off lets them be fetched again it is a 503 Knative retries, never a 401 it would not.
    issuer.add_key("k2", ec.generate_private_key(ec.SECP256R1()))
    try:
        clock.now += 3
        wall.now += 3
        rotated = issuer.sign({"iat": int(wall.now)}, kid="k2", algorithm="ES256")
        with pytest.raises(DependencyUnavailable) as unavailable:
            authenticator.authenticate(bearer(rotated))
        assert unavailable.value.retry_after == 2  # the back-off's 5 s, 3 of them gone
        assert unavailable.value.code == "key_not_fetched"  # alerts leave it out
        assert len(issuer.requests) == fetches
        clock.now += 10
        assert authenticator.authenticate(bearer(rotated)).kind == "oidc"
        assert len(issuer.requests) == fetches + 2  # discovery + JWKS
        with pytest.raises(Unauthenticated):
            authenticator.authenticate(bearer(rotated[:-4] + "AAAA"))
    finally:
        del issuer.keys["k2"]


def test_issuer_down_is_retryable_until_keys_are_cached(issuer: Issuer) -> None:
    clock = Clock()
    authenticator = gate(issuer, clock)
    issuer.up = False
    try:
        with pytest.raises(DependencyUnavailable):
            authenticator.authenticate(bearer(issuer.sign({})))
        issuer.up = True
        attempts = len(issuer.requests)
        # A failed fetch counts for the back-off too: nothing fetched for 5 s, still a 503.
        with pytest.raises(DependencyUnavailable) as caught:
            authenticator.authenticate(bearer(issuer.sign({})))
        assert caught.value.retry_after == 5 and len(issuer.requests) == attempts
        clock.now += 5
        assert authenticator.authenticate(bearer(issuer.sign({}))).kind == "oidc"
        issuer.up = False
        clock.now += 10_000  # stale, and the refresh fails: the cached keys still serve
        assert authenticator.authenticate(bearer(issuer.sign({}))).kind == "oidc"
        eventually(lambda: not authenticator.oidc.keys.fetching)
    finally:
        issuer.up = True


def test_issuer_down_is_a_503_that_names_neither_its_url_nor_why(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    """Answered to any caller, authenticated or not: the issuer's address and what failed
    there are the operator's to read, in the log."""
    authenticator = gate(issuer, Clock())
    issuer.up = False
    try:
        with caplog.at_level(logging.WARNING, "imagegen.auth"):
            for _ in range(2):  # the failed fetch's own answer, then one within its back-off
                with pytest.raises(DependencyUnavailable) as caught:
                    authenticator.authenticate(bearer(issuer.sign({})))
                assert caught.value.message == "OIDC signing keys are not available yet"
                assert caught.value.retry_after == 5
    finally:
        issuer.up = True
    assert f"OIDC discovery at {issuer.url} failed (HTTPStatusError)" in caplog.text


def test_a_discovery_url_with_credentials_is_logged_without_them(
    issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    """The failed fetch's log line quoted the URL whole, password and all."""
    keys = SigningKeys(f"https://alice:hunter2@127.0.0.1:{issuer.port}", clock=Clock())
    issuer.up = False
    try:
        with (
            caplog.at_level(logging.WARNING, "imagegen.auth"),
            pytest.raises(DependencyUnavailable),
        ):
            keys.get("k1")
        eventually(lambda: not keys.fetching)
    finally:
        issuer.up = True
    assert f"OIDC discovery at https://***@127.0.0.1:{issuer.port} failed" in caplog.text
    assert "hunter2" not in caplog.text and "alice" not in caplog.text


def test_the_pods_token_authenticates_discovery(issuer: Issuer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("pod-token\n")
    keys = SigningKeys(issuer.url, token_file=token_file)
    keys.get("k1")
    assert issuer.requests[-2:] == [
        ("/.well-known/openid-configuration", "Bearer pod-token"),
        ("/openid/v1/jwks", "Bearer pod-token"),
    ]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "x"])
def test_no_bearer_token_is_401_with_a_bare_challenge(issuer: Issuer, header: str | None) -> None:
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(header)
    assert caught.value.challenge == 'Bearer realm="imagegen"'


@pytest.mark.parametrize("token", ["a.b.c", "..", "x" * 20_000, "e30.e30.", "not-a-key"])
def test_junk_tokens_are_401(issuer: Issuer, token: str) -> None:
    with pytest.raises(Unauthenticated):
        gate(issuer).authenticate(bearer(token))


def test_api_keys_several_valid_at_once(issuer: Issuer) -> None:
    old, old_hash = new_api_key()
    new, new_hash = new_api_key()
    both = gate(issuer, api_key_hashes=f"{old_hash},{new_hash}")
    first, second = both.authenticate(bearer(old)), both.authenticate(bearer(new))
    assert (first.kind, second.kind) == ("api-key", "api-key")
    assert first.subject != second.subject
    assert old not in first.subject and old_hash not in first.subject

    rotated = gate(issuer, api_key_hashes=new_hash)
    assert rotated.authenticate(bearer(new)).kind == "api-key"
    with pytest.raises(Unauthenticated):
        rotated.authenticate(bearer(old))


def test_api_keys_are_stored_hashed(issuer: Issuer) -> None:
    key, digest = new_api_key()
    assert digest == hash_api_key(key) and key not in digest
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    # The key itself, by mistake: refused as the settings are read, naming the setting.
    with pytest.raises(ValidationError) as refused:
        gate(issuer, api_key_hashes=key)
    assert refused.value.errors()[0]["loc"] == ("api_key_hashes",)
    assert "is an API key, not its hash" in str(refused.value) and key not in str(refused.value)


def test_off_admits_everyone(issuer: Issuer) -> None:
    assert gate(issuer, auth_required=False).authenticate(None).kind == "anonymous"


def test_on_in_prod_off_in_dev() -> None:
    assert Settings(profile="prod").auth_required is True
    assert Settings(profile="dev").auth_required is False
    assert Settings(profile="prod", auth_required=False).auth_required is False


def _made_up_kid(token: str, kid: str) -> str:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": kid}).encode())
    return ".".join([header.decode().rstrip("="), *token.split(".")[1:]])


def test_failed_refreshes_count_for_the_back_off(issuer: Issuer) -> None:
    clock = Clock()
    authenticator = gate(issuer, clock)
    token = issuer.sign({})
    authenticator.authenticate(bearer(token))
    issuer.up = False
    try:
        clock.now += 10  # past the 5 s between refreshes, within the TTL
        before = len(issuer.requests)
        # Made-up kids on tokens issued before the keys were fetched, the issuer down, no time
        # passing: no key of theirs can have been published since.
        old = issuer.sign({"iat": int(time.time()) - 100})
        for n in range(20):
            with pytest.raises(Unauthenticated):
                authenticator.authenticate(bearer(_made_up_kid(old, f"bogus{n}")))
        assert len(issuer.requests) - before == 1  # one discovery attempt in all
        clock.now += 10_000  # stale now: valid tokens, served by the cached keys
        before = len(issuer.requests)
        for _ in range(20):
            assert authenticator.authenticate(bearer(token)).kind == "oidc"
        eventually(lambda: not authenticator.oidc.keys.fetching)
        assert len(issuer.requests) - before == 1
    finally:
        issuer.up = True


def test_a_hanging_refresh_holds_up_no_token_whose_key_is_cached(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagegen.auth import oidc

    # A refresh that hangs this long: a token that waited for it would take that long, far
    # past the bound below, which a loaded machine's few calls stay well inside.
    monkeypatch.setattr(oidc, "_FETCH_TIMEOUT", 20.0)
    clock = Clock()
    keys = SigningKeys(issuer.url, ttl=300, clock=clock)
    authenticator = Authenticator(
        Settings(
            auth_required=True,
            oidc_discovery_url=issuer.url,
            oidc_ca_file=None,
            oidc_token_file=None,
        ),
        function="render",
        keys=keys,
    )
    token = issuer.sign({})
    authenticator.authenticate(bearer(token))
    with socket.create_server(("127.0.0.1", 0)) as hanging:  # accepts, never answers
        keys.discovery_url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
        clock.now += 301  # stale: the first token starts a refresh, and does not wait for it
        started = time.monotonic()
        assert authenticator.authenticate(bearer(token)).kind == "oidc"
        conn, _ = hanging.accept()  # the refresh is under way
        for _ in range(3):
            assert authenticator.authenticate(bearer(token)).kind == "oidc"
        assert time.monotonic() - started < 5.0
        conn.close()  # the refresh ends now, its answer cut off
        eventually(lambda: not keys.fetching)


def _token_with_header(issuer: Issuer, header: dict[str, Any]) -> str:
    return ".".join([_b64(header), *issuer.sign({}).split(".")[1:]])


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": 1},
        {"alg": "RS256", "kid": ["k1"]},
        {"alg": "RS256", "kid": "k1", "crit": "x"},
        {"alg": ["RS256"], "kid": "k1"},
    ],
    ids=["kid-number", "kid-list", "crit-not-a-list", "alg-list"],
)
def test_a_header_pyjwt_refuses_is_401_not_an_error(issuer: Issuer, header: dict[str, Any]) -> None:
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(_token_with_header(issuer, header)))
    assert caught.value.challenge == 'Bearer realm="imagegen", error="invalid_token"'


def test_a_key_missing_from_keys_fetched_after_the_token_was_issued_is_401(
    issuer: Issuer,
) -> None:
    """Made-up kids stay 401s, the back-off or an issuer down notwithstanding."""
    clock = Clock()
    authenticator = gate(issuer, clock)
    authenticator.authenticate(bearer(issuer.sign({})))
    clock.now += 1  # within the back-off: no fetch
    # Issued before the keys were fetched by more than the clocks may differ (the leeway).
    issued_before = issuer.sign({"iat": int(time.time()) - 100})
    with pytest.raises(Unauthenticated) as caught:
        authenticator.authenticate(bearer(_made_up_kid(issued_before, "bogus")))
    assert "does not publish" in caught.value.message
    # Issued ahead of this clock (within the leeway): as if now, so keys fetched this second
    # are taken to hold its key; no 503 anyone could ask for again and again.
    ahead = issuer.sign({"iat": int(time.time()) + 30})
    clock.now += 10  # past the back-off: the unknown kid fetches the keys again
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(bearer(_made_up_kid(ahead, "bogus2")))
    # Issued in the future beyond the leeway: refused as such, before any key is looked up.
    future = issuer.sign({"iat": int(time.time()) + 600})
    with pytest.raises(Unauthenticated) as caught:
        authenticator.authenticate(bearer(_made_up_kid(future, "bogus")))
    assert "not valid yet" in caught.value.message


def test_a_rotation_within_the_clock_skew_is_retried_not_refused(issuer: Issuer) -> None:
    """This pod's clock 2 s ahead of the issuer's: a key the issuer published just after the
    keys were fetched, by its own clock, is still a 503 Knative retries, not a lost event."""
    clock, wall = Clock(), Clock()
    fetched = int(time.time())  # by the issuer's clock
    wall.now = float(fetched + 2)
    authenticator = gate(issuer, clock, wall, oidc_clock_skew=5)
    authenticator.authenticate(bearer(issuer.sign({})))
    # Clocks further apart than the leeway are not allowed for: a key missing is a 401.
    strict = gate(issuer, clock, wall, oidc_clock_skew=1)
    strict.authenticate(bearer(issuer.sign({})))
    issuer.add_key("k2", ec.generate_private_key(ec.SECP256R1()))
    try:
        clock.now += 1  # within the back-off: no fetch
        wall.now += 1
        rotated = issuer.sign({"iat": fetched + 1}, kid="k2", algorithm="ES256")
        with pytest.raises(KeyNotFetched):
            authenticator.authenticate(bearer(rotated))
        with pytest.raises(Unauthenticated):
            strict.authenticate(bearer(rotated))
    finally:
        del issuer.keys["k2"]


def _claims_as_written(header: dict[str, Any], claims: str) -> str:
    """A token whose claims are the JSON text given, unsigned: anyone can send one."""
    payload = base64.urlsafe_b64encode(claims.encode()).rstrip(b"=").decode()
    return f"{_b64(header)}.{payload}.AAAA"


@pytest.mark.parametrize("kid", ["k1", "bogus"])
@pytest.mark.parametrize(
    "value",
    ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400, "-1" + "0" * 400],
    ids=["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "10**400", "-10**400"],
)
def test_an_iat_that_is_no_time_is_401_not_an_error(issuer: Issuer, kid: str, value: str) -> None:
    # Python's JSON (PyJWT's) reads NaN, Infinity and integers no float holds; they must not
    # reach the clock's sums.
    clock = Clock()
    authenticator = gate(issuer, clock)
    authenticator.authenticate(bearer(issuer.sign({})))
    clock.now += 1  # keys cached, fetched before this token came
    token = _claims_as_written({"alg": "RS256", "kid": kid}, f'{{"iat": {value}, "sub": "x"}}')
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(bearer(token))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_signed_times_that_are_no_times_are_401(issuer: Issuer, claim: str, value: float) -> None:
    # PyJWT refuses these itself (int() of them fails); the issuer's signature changes nothing.
    with pytest.raises(Unauthenticated):
        gate(issuer).authenticate(bearer(issuer.sign({claim: value})))


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("kind", ["digits", "past-digits", "true", "false", "10**400"])
def test_signed_times_that_are_no_json_numbers_are_401_naming_the_claim(
    issuer: Issuer, claim: str, kind: str
) -> None:
    # RFC 7519 (section 2): a NumericDate is a JSON number. PyJWT int()s what it checks, so
    # each of these passed it, signed by the issuer, and was taken for a time: a valid one,
    # or one it refuses as expired (true is 1, 1970) or not valid yet (a time far ahead).
    now = int(time.time())
    valid = {"exp": now + 600, "nbf": now, "iat": now}[claim]
    value = {
        "digits": str(valid),
        "past-digits": "1",
        "true": True,
        "false": False,
        "10**400": 10**400,
    }[kind]
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(issuer.sign({claim: value})))
    assert caught.value.message == f"the token's {claim!r} claim is invalid"
    assert caught.value.challenge == 'Bearer realm="imagegen", error="invalid_token"'


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": -600.5}, "the token has expired"),
        ({"nbf": 600.0}, "the token is not valid yet"),
        ({"iat": 600, "nbf": 0}, "the token is not valid yet"),
    ],
    ids=["exp-past", "nbf-ahead", "iat-ahead"],
)
def test_a_time_refused_as_a_time_is_still_named_so(
    issuer: Issuer, claims: dict[str, float], message: str
) -> None:
    """A NumericDate past, or ahead, is answered as such, not as a claim of the wrong kind."""
    now = int(time.time())
    token = issuer.sign({claim: now + offset for claim, offset in claims.items()})
    with pytest.raises(Unauthenticated) as caught:
        gate(issuer).authenticate(bearer(token))
    assert caught.value.message == message


def _response(document: object) -> bytes:
    """An HTTP response carrying ``document`` as JSON, the connection closed after it."""
    body = json.dumps(document).encode()
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@contextmanager
def _raw_issuer(answer: Callable[[str], tuple[bytes, int]]) -> Iterator[int]:
    """An issuer on loopback, its port: ``answer(path)`` gives the response to a GET, sent
    at once up to the offset it gives too, then a byte every 0.1 s (each read well within
    httpx's timeout, the whole taking seconds)."""
    stop = threading.Event()

    def reply(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client may hang up first
            request = conn.recv(65536).decode("latin-1").split(" ")
            response, sent_at_once = answer(request[1] if len(request) > 1 else "")
            conn.sendall(response[:sent_at_once])
            for byte in response[sent_at_once:]:
                if stop.wait(0.1):
                    return
                conn.sendall(bytes([byte]))

    def serve(server: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=reply, args=(conn,), daemon=True).start()

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.05)
        threading.Thread(target=serve, args=(server,), daemon=True).start()
        try:
            yield server.getsockname()[1]
        finally:
            stop.set()


@pytest.mark.parametrize("dripped", ["headers", "body"])
def test_a_slow_issuer_holds_no_request_nor_the_fetch_past_its_deadline(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, dripped: str
) -> None:
    """httpx's timeouts bound each read: headers sent a byte at a time never meet them."""
    from imagegen.auth import oidc

    monkeypatch.setattr(oidc, "_FETCH_TIMEOUT", 0.5)
    response = _response({"issuer": issuer.issuer, "jwks_uri": issuer.url + "/openid/v1/jwks"})
    # About 9 s of headers, or 10 s of the document after them.
    sent_at_once = 0 if dripped == "headers" else response.index(b"\r\n\r\n") + 4

    with _raw_issuer(lambda path: (response, sent_at_once)) as port:
        keys = SigningKeys(f"http://127.0.0.1:{port}", clock=Clock())
        authenticator = Authenticator(
            Settings(auth_required=True, oidc_ca_file=None, oidc_token_file=None),
            function="render",
            keys=keys,
        )
        token = issuer.sign({})
        answers: list[tuple[object, float]] = []

        def ask() -> None:
            started = time.monotonic()
            try:
                answer: object = authenticator.authenticate(bearer(token))
            except DependencyUnavailable as exc:
                answer = exc
            answers.append((answer, time.monotonic() - started))

        # Nothing cached: the first request starts the fetch, the second waits for it.
        started = time.monotonic()
        asking = [threading.Thread(target=ask) for _ in range(2)]
        with caplog.at_level(logging.WARNING, "imagegen.auth"):
            for thread in asking:
                thread.start()
            for thread in asking:
                thread.join(timeout=30)
            assert len(answers) == 2
            for answer, took in answers:
                assert isinstance(answer, DependencyUnavailable) and answer.retry_after == 5
                assert took < 2.0  # the deadline's 0.5 s and a margin
            # The fetch ends too, by its deadline: another can start once the back-off ends.
            eventually(lambda: not keys.fetching, within=15)
            assert time.monotonic() - started < 2.0
    assert f"OIDC discovery at http://127.0.0.1:{port} failed (TimeoutError: " in caplog.text


@pytest.mark.parametrize(
    "failure", ["no-object", "oversize", "slow", "jwks-no-object", "jwks-oversize", "jwks-slow"]
)
def test_credentials_in_the_issuers_urls_are_neither_logged_nor_answered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """The discovery URL and the jwks_uri a discovery document names can carry a user name,
    password or token; what a fetch that fails says of either names neither."""
    from imagegen.auth import oidc

    monkeypatch.setattr(oidc, "_FETCH_TIMEOUT", 0.5)
    secrets = ["alice", "s3cretpass", "discoverytoken", "bob", "jwkspass", "jwkstoken"]
    jwks_uri = "http://bob:jwkspass@127.0.0.1:{port}/openid/v1/jwks?token=jwkstoken"
    failing = {
        "no-object": (_response([1, 2]), None),
        "oversize": (_response(["x" * (1 << 20)]), None),
        "slow": (_response({}), 0),
    }[failure.removeprefix("jwks-")]

    def answer(path: str) -> tuple[bytes, int]:
        response, sent_at_once = failing
        if failure.startswith("jwks-") and not path.startswith("/openid/v1/jwks"):
            response, sent_at_once = _response({"issuer": "x", "jwks_uri": jwks_uri}), None
        return response, len(response) if sent_at_once is None else sent_at_once

    with _raw_issuer(answer) as port:
        jwks_uri = jwks_uri.format(port=port)
        keys = SigningKeys(
            f"http://alice:s3cretpass@127.0.0.1:{port}/issuer?token=discoverytoken", clock=Clock()
        )
        with caplog.at_level(logging.WARNING), pytest.raises(DependencyUnavailable) as caught:
            keys.get("k1")
        eventually(lambda: not keys.fetching)
    said = caplog.text + str(caught.value) + caught.value.message
    assert [secret for secret in secrets if secret in said] == []
    # Said all the same, where and what: the URLs without what they carried.
    failed = {"no-object": "JSON that is no object", "oversize": "more than", "slow": "within"}
    assert failed[failure.removeprefix("jwks-")] in caplog.text
    where = "/openid/v1/jwks" if failure.startswith("jwks-") else "/issuer"
    assert f"http://***@127.0.0.1:{port}{where}" in caplog.text


def test_a_fetch_that_hangs_past_its_deadline_holds_no_request_longer(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving the issuer's name, for one, is no read httpx's timeouts bound."""
    from imagegen.auth import oidc

    clock = Clock()
    authenticator = gate(issuer, clock)
    authenticator.authenticate(bearer(issuer.sign({})))
    released = threading.Event()

    def hanging(*args: object) -> dict[str, Any]:
        released.wait(10)
        raise TimeoutError("released")

    monkeypatch.setattr(oidc, "_FETCH_TIMEOUT", 0.5)
    monkeypatch.setattr(oidc, "_json", hanging)
    clock.now += 10  # past the back-off: an unknown kid fetches, and waits for the keys
    token = _made_up_kid(issuer.sign({}), "k2")
    started = time.monotonic()
    try:
        with pytest.raises(KeyNotFetched) as caught:
            authenticator.authenticate(bearer(token))
        assert time.monotonic() - started < 2.0  # the deadline's 0.5 s and a margin
        assert caught.value.retry_after == 5  # no time has passed by ``clock``
        # Meanwhile the cached keys serve, as ever.
        assert authenticator.authenticate(bearer(issuer.sign({}))).kind == "oidc"
    finally:
        released.set()
        eventually(lambda: not authenticator.oidc.keys.fetching)


def test_a_request_that_waited_for_a_failed_fetch_waits_for_no_other(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch that fails as the back-off ends (an issuer that hangs fails at the fetch's
    deadline, 5 s, the back-off's length): the requests that waited for it are answered,
    not handed on to the next fetch and its 5 s, fetch after fetch."""
    from imagegen.auth import oidc

    fetches: list[threading.Event] = []
    stop = threading.Event()

    def failing(*args: object) -> dict[str, Any]:
        failed = threading.Event()  # the test says when this fetch fails
        fetches.append(failed)
        (failed if len(fetches) == 1 else stop).wait(30)
        raise TimeoutError("released")

    # Far longer than the test: only the rule ends the wait, not a deadline.
    monkeypatch.setattr(oidc, "_FETCH_TIMEOUT", 60.0)
    monkeypatch.setattr(oidc, "_json", failing)
    clock = Clock()
    keys = SigningKeys(issuer.url, clock=clock)  # nothing cached
    answers: list[tuple[object, float]] = []

    def ask() -> None:
        started = time.monotonic()
        try:
            answer: object = keys.get("k1", time.time())
        except DependencyUnavailable as exc:
            answer = exc
        answers.append((answer, time.monotonic() - started))

    asking = threading.Thread(target=ask)
    asking.start()
    try:
        # The fetch started by the request is under way; the request waits for it, holding
        # the lock until it does, so the fetch cannot end before it waits.
        eventually(lambda: len(fetches) == 1)
        clock.now += oidc._MIN_REFRESH_SECONDS + 1  # the back-off is over as the fetch fails
        fetches[0].set()
        asking.join(timeout=10)
        assert not asking.is_alive(), "still waiting, for a fetch of its own"
        [(answer, took)] = answers
        assert isinstance(answer, DependencyUnavailable), answer
        assert answer.message == "OIDC signing keys are not available yet"
        assert answer.retry_after == 1  # the next request may fetch again
        assert took < 10
        assert len(fetches) == 1  # the request that waited started no other
        # A request that comes now, having waited for none, fetches them again.
        later = threading.Thread(target=ask)
        later.start()
        eventually(lambda: len(fetches) == 2)
    finally:
        stop.set()
        eventually(lambda: not keys.fetching)


def test_the_pods_token_goes_in_clear_text_to_the_discovery_origin_alone(
    issuer: Issuer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("pod-token\n")
    elsewhere = Issuer()  # the same host, another port: another origin
    elsewhere.keys = issuer.keys
    with elsewhere:
        issuer.documents["discovery"] = {
            "issuer": issuer.issuer,
            "jwks_uri": elsewhere.url + "/openid/v1/jwks",
        }
        try:
            _, key = SigningKeys(issuer.url, token_file=token_file).get("k1")
        finally:
            issuer.documents = {}
    assert key is not None
    assert issuer.requests[-1] == ("/.well-known/openid-configuration", "Bearer pod-token")
    assert elsewhere.requests == [("/openid/v1/jwks", None)]


def test_the_pods_token_goes_to_a_jwks_uri_over_tls_elsewhere(tmp_path: Path) -> None:
    # As the API server of kubeadm and kind names its keys: at its advertised address, another
    # origin than kubernetes.default.svc, answering only an authenticated caller.
    token_file = tmp_path / "token"
    token_file.write_text("pod-token\n")
    api, advertised = Issuer(), Issuer()
    ca_file = api.serve_tls(tmp_path)
    advertised.serve_tls(tmp_path)  # the same cluster's certificate
    advertised.add_key("k1")
    with api, advertised:
        jwks_uri = advertised.url + "/openid/v1/jwks"
        api.documents["discovery"] = {"issuer": api.issuer, "jwks_uri": jwks_uri}
        _, key = SigningKeys(api.url, ca_file=ca_file, token_file=token_file).get("k1")
    assert key is not None
    assert api.requests == [("/.well-known/openid-configuration", "Bearer pod-token")]
    assert advertised.requests == [("/openid/v1/jwks", "Bearer pod-token")]


def test_a_jwks_uri_in_clear_text_after_https_discovery_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("pod-token\n")
    plain, tls = Issuer(), Issuer()
    ca_file = tls.serve_tls(tmp_path)
    tls.add_key("k1")
    plain.keys = tls.keys
    with plain, tls:
        jwks_uri = plain.url + "/openid/v1/jwks"
        tls.documents["discovery"] = {"issuer": tls.issuer, "jwks_uri": jwks_uri}
        keys = SigningKeys(tls.url, ca_file=ca_file, token_file=token_file)
        with (
            caplog.at_level(logging.WARNING, "imagegen.auth"),
            pytest.raises(DependencyUnavailable) as caught,
        ):
            keys.get("k1")
        assert "jwks_uri" not in caught.value.message  # said in the log alone
        assert "jwks_uri not over https" in caplog.text
        assert tls.requests == [("/.well-known/openid-configuration", "Bearer pod-token")]
        assert plain.requests == []
        # Named over https, the same keys are fetched.
        tls.documents = {}
        assert SigningKeys(tls.url, ca_file=ca_file).get("k1")[1] is not None


@pytest.mark.parametrize(
    ("discovery", "jwks"),
    [
        ([1, 2], None),
        (None, {"keys": {"kid": "k1"}}),
        (None, [{"kid": "k1"}]),
        (None, {"keys": ["k1", 7, None]}),
    ],
    ids=["discovery-a-list", "keys-an-object", "jwks-a-list", "keys-not-objects"],
)
def test_issuer_documents_of_the_wrong_shape_are_an_outage_not_an_error(
    issuer: Issuer, discovery: Any, jwks: Any
) -> None:
    clock = Clock()
    authenticator = gate(issuer, clock)
    token = issuer.sign({})
    issuer.documents = {"discovery": discovery, "jwks": jwks}
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            authenticator.authenticate(bearer(token))
        assert caught.value.retry_after == 5
        issuer.documents = {}
        clock.now += 5
        assert authenticator.authenticate(bearer(token)).kind == "oidc"
        # Cached keys keep serving when a refresh finds a document of the wrong shape.
        issuer.documents = {"discovery": discovery, "jwks": jwks}
        clock.now += 10_000
        assert authenticator.authenticate(bearer(token)).kind == "oidc"
        eventually(lambda: not authenticator.oidc.keys.fetching)
    finally:
        issuer.documents = {}


def test_the_api_key_command_runs_without_a_warning() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-m", "imagegen.auth.api_keys"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == ""
    key, digest = (line.split()[1] for line in done.stdout.splitlines())
    assert hash_api_key(key) == digest
