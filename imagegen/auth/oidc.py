"""Verifying Kubernetes service-account tokens (OIDC ID tokens) against the issuer's keys.

Follows Knative Eventing's receivers (``knative/eventing``, ``pkg/auth/verifier.go``, which use
``coreos/go-oidc``): fetch ``<discovery>/.well-known/openid-configuration``, take its
``issuer`` and ``jwks_uri``, then require a signature by one of those keys, ``iss`` equal to the
issuer, an unexpired ``exp``, and the audience among ``aud``. The API server answers discovery
to service accounts, so the pod's own token and CA are used when mounted; the token goes to
the discovery URL's origin and to a ``jwks_uri`` over TLS, never in clear text to another origin.

Keys are cached for ``oidc_jwks_ttl`` seconds. A token naming a key not in the cache (the
issuer rotated its keys) refreshes it at once, but at most every few seconds, failed attempts
counted, so tokens with made-up key ids (or an issuer that is down) cannot turn every request
into a fetch. A key missing from keys fetched before the token was issued may be one the issuer
published since: while they cannot be fetched again (the back-off, an issuer down), that token
is a retryable 503, not a 401 Knative would never retry. One fetch at a time, in a thread of
its own and within one deadline: while it runs, tokens whose key is cached are checked against
the cached keys (stale ones included: the request that finds them stale does not wait either),
and only those that need the new keys wait for it, until its deadline at most. A request waits
for one fetch only, and no longer than a fetch's time from its coming: should that fetch fail,
it is answered, not handed on to the next fetch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen._redact import redact_url
from imagegen.errors import DependencyUnavailable, Forbidden, Unauthenticated

if TYPE_CHECKING:
    import httpx
    import jwt

__all__ = ["ALGORITHMS", "KeyNotFetched", "OidcVerifier", "SigningKeys"]

log = logging.getLogger("imagegen.auth")

# What Kubernetes signs service-account tokens with (RSA or ECDSA keys); never "none" or HMAC.
ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"]
_ACCEPTED = f"only {', '.join(ALGORITHMS[:-1])} or {ALGORITHMS[-1]} are"
_MIN_REFRESH_SECONDS = 5.0
# Seconds for a whole fetch, discovery and JWKS, by the clock on the wall: httpx's timeouts
# bound each read, and an issuer that answers a byte at a time would never meet them (see
# _Cutoff).
_FETCH_TIMEOUT = 5.0
# Far more than an issuer's few keys take: a document past it is no JWKS.
_MAX_DOCUMENT_BYTES = 1 << 20


class KeyNotFetched(DependencyUnavailable):
    """A token's key is not among keys fetched before it was issued, and they cannot be
    fetched again yet: retried (a rotation is seen within seconds), and a code of its own,
    since anyone can send such a token (alerts leave it out)."""

    code = "key_not_fetched"


@dataclass(frozen=True)
class _KeySet:
    issuer: str
    keys: dict[str, jwt.PyJWK]
    fetched_at: float  # the monotonic clock's, when the fetch began
    published_at: float  # the wall clock's, as a token's ``iat`` counts


class SigningKeys:
    """The issuer and its signing keys, fetched through discovery and cached.

    Args:
        discovery_url: Base URL of ``/.well-known/openid-configuration``.
        ttl: Seconds a fetched key set is used before it is fetched again.
        ca_file: CA bundle to trust for the fetches, when the file exists.
        token_file: A bearer token to send (the pod's own) to the discovery URL and a
            ``jwks_uri`` over TLS, when the file exists.
        clock: Seconds, monotonic (injectable for tests).
        wall_clock: Seconds since the epoch, as tokens' ``iat`` (injectable for tests).
    """

    def __init__(
        self,
        discovery_url: str,
        *,
        ttl: float = 300.0,
        ca_file: Path | None = None,
        token_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.discovery_url = discovery_url.rstrip("/")
        self.ttl = ttl
        self.ca_file = ca_file
        self.token_file = token_file
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._fetched = threading.Condition(self._lock)  # notified when a fetch ends
        self._set: _KeySet | None = None
        self._fetching = False
        self._fetches = 0  # fetches started: which one a waiting request waits for
        self._attempted_at: float | None = None  # the last fetch's start, failed or not
        # When the fetch under way gives up, by time.monotonic(): waiting for it is bounded
        # in real time, whatever ``clock`` says.
        self._deadline = 0.0

    @property
    def fetching(self) -> bool:
        """Whether a fetch is under way."""
        return self._fetching

    @property
    def where(self) -> str:
        """The discovery URL as messages and logs say it: without a user name or password."""
        return redact_url(self.discovery_url)

    def get(
        self, kid: str, issued_at: float | None = None, *, leeway: float = 0.0
    ) -> tuple[str, jwt.PyJWK | None]:
        """(issuer, the key named ``kid`` or None), refreshing the cache when it is due.

        Args:
            kid: The key a token names.
            issued_at: The token's ``iat``, unverified: a key missing from keys fetched before
                then may be one published since.
            leeway: Seconds the issuer's clock may be behind this one's.

        Raises:
            DependencyUnavailable: the issuer's documents cannot be fetched (within the fetch's
                deadline) and nothing is cached; or ``kid`` is missing from keys fetched before
                ``issued_at``, and they cannot be fetched again now.
        """
        arrived = self._clock()
        # This request's own bound, whatever fetches come and go: a fetch that fails as the
        # back-off ends would otherwise hand its waiters on to the next fetch, and the next.
        give_up = time.monotonic() + _FETCH_TIMEOUT
        awaited: int | None = None  # the fetch this request waited for, once it has
        with self._lock:
            while True:
                now = self._clock()
                current = self._set
                if awaited is None and not self._fetching and self._due(current, kid, now):
                    self._start_fetch(now)
                waiting = current is None or kid not in current.keys
                # Until this request's deadline, or the fetch's if sooner; for one fetch only.
                remaining = min(give_up, self._deadline) - time.monotonic()
                over = awaited is not None and awaited != self._fetches  # another fetch began
                if over or not (self._fetching and waiting and remaining > 0):
                    return self._answer(current, kid, issued_at, leeway, arrived, now)
                awaited = self._fetches
                self._fetched.wait(remaining)  # the key may be among those being fetched

    def _due(self, current: _KeySet | None, kid: str, now: float) -> bool:
        """Whether to fetch: nothing cached, or stale, or ``kid`` unknown; never twice within
        the back-off, whether the last fetch failed or not."""
        if self._attempted_at is not None and now - self._attempted_at < _MIN_REFRESH_SECONDS:
            return False
        return current is None or now - current.fetched_at >= self.ttl or kid not in current.keys

    def _start_fetch(self, now: float) -> None:
        """Starts a fetch in a thread of its own (the lock held): a request needing its keys
        waits for it until its deadline, and the fetch itself ends soon after."""
        self._fetching = True
        self._fetches += 1
        self._attempted_at = now
        self._deadline = time.monotonic() + _FETCH_TIMEOUT
        threading.Thread(
            target=self._refresh, args=(now, self._deadline), name="oidc-keys", daemon=True
        ).start()

    def _refresh(self, now: float, deadline: float) -> None:
        fetched: _KeySet | None = None
        try:
            fetched = self._fetch(now, deadline)
        except DependencyUnavailable as exc:
            # Why is said here only: it names internal addresses and causes (see _answer).
            cached = "using the cached ones" if self._set is not None else "none are cached"
            log.warning("signing keys could not be fetched (%s); %s", exc.message, cached)
        except Exception:  # a thread of its own: nobody else would hear of it
            log.exception("signing keys could not be fetched")
        finally:
            with self._lock:
                self._fetching = False
                if fetched is not None:
                    self._set = fetched
                self._fetched.notify_all()

    def _answer(
        self,
        current: _KeySet | None,
        kid: str,
        issued_at: float | None,
        leeway: float,
        arrived: float,
        now: float,
    ) -> tuple[str, jwt.PyJWK | None]:
        if current is None:
            # Answered to a caller not yet authenticated: a refusal says what was wrong, not
            # the issuer's internal URL or why its fetch failed, which _refresh logs.
            raise DependencyUnavailable(
                "OIDC signing keys are not available yet", retry_after=self._next_fetch_in(now)
            )
        key = current.keys.get(kid)
        # Keys are published before tokens are signed with them: fetched once this request
        # had come, these would hold its key. Fetched before, they may not yet, if fetched
        # before the token was issued: in whole seconds, as iat counts (keys fetched in the
        # second it was issued are taken to hold its key), and the issuer's clock may be
        # ``leeway`` seconds behind the one that stamped ``published_at``.
        if (
            key is None
            and issued_at is not None
            and current.fetched_at < arrived
            and math.floor(current.published_at) < math.floor(issued_at) + leeway
        ):
            raise KeyNotFetched(
                "the token names a key the issuer may have published since its keys were"
                " fetched; they cannot be fetched again yet",
                retry_after=self._next_fetch_in(now),
            )
        return current.issuer, key

    def _next_fetch_in(self, now: float) -> int:
        """Whole seconds, at least 1, until the back-off lets the keys be fetched again."""
        if self._attempted_at is None:
            return 1
        return max(1, math.ceil(self._attempted_at + _MIN_REFRESH_SECONDS - now))

    def _fetch(self, now: float, deadline: float) -> _KeySet:
        credentials: dict[str, str] = {}
        if self.token_file is not None and self.token_file.is_file():
            credentials["Authorization"] = "Bearer " + self.token_file.read_text().strip()
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None and self.ca_file.is_file():
            # The cluster's CA beside the system's: a managed cluster's API server may name its
            # JWKS on a public host (a certificate of a public CA).
            verify = ssl.create_default_context()
            verify.load_verify_locations(cafile=str(self.ca_file))
        # Only when keys are fetched or a token checked: a function with OIDC off loads neither
        # (PyJWT and its cryptography backends take a tenth of a second to import).
        import httpx
        import jwt

        try:
            discovery_url = httpx.URL(self.discovery_url + "/.well-known/openid-configuration")
            with (
                _Cutoff(deadline) as cutoff,
                httpx.Client(verify=verify, headers={"Accept": "application/json"}) as client,
            ):
                discovery = _json(client, discovery_url, credentials, cutoff)
                issuer, jwks_uri = discovery.get("issuer"), discovery.get("jwks_uri")
                if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
                    raise ValueError("the discovery document names no issuer or jwks_uri")
                # The pod's token goes where discovery went, and to the jwks_uri the discovery
                # document names over TLS, never in clear text to another origin. The API server
                # names its keys at its advertised address (https://<node-ip>:6443/openid/v1/jwks
                # on kubeadm and kind: kubernetes/kubernetes pkg/serviceaccount/
                # openidmetadata.go), which answers only an authenticated caller (the
                # system:service-account-issuer-discovery binding); Knative's verifier sends
                # the same token there (knative/eventing pkg/auth/verifier.go, getHTTPClient:
                # the API server's own client, whose transport adds it to every request).
                jwks_url = httpx.URL(jwks_uri)
                if discovery_url.scheme == "https" and jwks_url.scheme != "https":
                    raise ValueError("the discovery document names a jwks_uri not over https")
                trusted = jwks_url.scheme == "https" or _origin(jwks_url) == _origin(discovery_url)
                jwks = _json(client, jwks_url, credentials if trusted else {}, cutoff)
                entries = jwks.get("keys")
                if not isinstance(entries, list):
                    raise ValueError("the JWKS document has no list of keys")
        except (httpx.HTTPError, httpx.InvalidURL, ValueError, TimeoutError) as exc:
            detail = type(exc).__name__
            if not isinstance(exc, httpx.HTTPError):
                detail += f": {exc}"  # said by this module or httpx, never by the issuer
            raise DependencyUnavailable(
                f"OIDC discovery at {self.where} failed ({detail})",
                retry_after=int(_MIN_REFRESH_SECONDS),
            ) from exc
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                continue  # no JWK: nothing signs with it
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, TypeError, KeyError, ValueError):
                continue  # a key type this process cannot use: tokens signed with it fail
            if isinstance(key.key_id, str) and key.key_id:
                keys[key.key_id] = key
        if not keys:
            # An issuer signs with some key: none usable is a broken document (a proxy's?),
            # which must not replace keys that work.
            raise DependencyUnavailable(
                f"OIDC discovery at {self.where} found no usable signing key",
                retry_after=int(_MIN_REFRESH_SECONDS),
            )
        published_at = self._wall_clock()
        return _KeySet(issuer=issuer, keys=keys, fetched_at=now, published_at=published_at)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """Scheme, host and port, the default port spelled out, as browsers compare origins."""
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, port


class _Cutoff:
    """Shuts a fetch's connections down at its deadline, from a timer thread of its own.

    httpx's timeouts bound each read, not a response: an issuer sending its status line and
    headers a byte at a time (or its TLS handshake) would hold the fetch, and every fetch
    after it, for as long as it liked. Each connection's socket is taken as it is opened
    (httpx's ``trace`` request extension: httpcore's ``connect_tcp`` event) and duplicated,
    so that shutting the copy down ends the reads on it, TLS or not, whatever httpcore has
    closed or wrapped meanwhile.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.passed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._cut)
        self._timer.daemon = True

    def __enter__(self) -> _Cutoff:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpcore's trace callback: takes each connection as it is opened."""
        if not event.endswith("connect_tcp.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        if not isinstance(sock, socket.socket):
            return
        with self._lock:
            copy = sock.dup()
            self._sockets.append(copy)
            if self.passed:  # opened as the deadline passed: ends at once
                _shut(copy)

    def _cut(self) -> None:
        with self._lock:
            self.passed = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Ends the reads and writes on ``sock``'s connection, in whatever thread they wait."""
    with contextlib.suppress(OSError):  # the peer may have closed it already
        sock.shutdown(socket.SHUT_RDWR)


def _json(
    client: httpx.Client, url: httpx.URL, headers: dict[str, str], cutoff: _Cutoff
) -> dict[str, Any]:
    """The JSON object at ``url``, read whole by ``cutoff``'s deadline; ValueError for any
    other document, TimeoutError past the deadline. Messages name ``url`` without its user
    name, password or query, which may hold credentials."""
    where = redact_url(str(url))
    remaining = cutoff.deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"{where} was not asked for within {_FETCH_TIMEOUT:g} s")
    try:
        with client.stream(
            "GET", url, headers=headers, timeout=remaining, extensions={"trace": cutoff.trace}
        ) as reply:
            reply.raise_for_status()
            body = bytearray()
            for chunk in reply.iter_bytes():
                body += chunk
                if len(body) > _MAX_DOCUMENT_BYTES:
                    raise ValueError(f"{where} answered more than {_MAX_DOCUMENT_BYTES} bytes")
                if time.monotonic() > cutoff.deadline:
                    raise TimeoutError(f"{where} was not read within {_FETCH_TIMEOUT:g} s")
    except Exception as exc:
        if not cutoff.passed or isinstance(exc, TimeoutError):
            raise
        # Whatever the connection shut down made of it (a read error, a closed TLS socket).
        raise TimeoutError(f"{where} was not read within {_FETCH_TIMEOUT:g} s") from exc
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError(f"{where} answered JSON that is no object")
    return document


class OidcVerifier:
    """Verifies one function's tokens: signed by the issuer, unexpired, for its audience.

    Args:
        keys: The issuer's signing keys.
        audience: What ``aud`` must contain for this function.
        leeway: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
        subjects: Subjects admitted; empty admits any subject with the right audience.
    """

    def __init__(
        self,
        keys: SigningKeys,
        *,
        audience: str,
        leeway: float = 60.0,
        subjects: list[str] | None = None,
    ) -> None:
        self.keys = keys
        self.audience = audience
        self.leeway = leeway
        self.subjects = set(subjects or [])

    def verify(self, token: str) -> str:
        """The token's subject once the token verifies.

        Raises:
            Unauthenticated: malformed, unsigned, wrongly signed, expired, not yet valid,
                from another issuer, signed by an unknown key, or for another audience.
            Forbidden: a valid token of a subject not admitted.
            DependencyUnavailable: the issuer's keys cannot be fetched.
        """
        import jwt

        # 1. The header names the key; anything but an asymmetric algorithm is refused.
        # PyJWT's own checks of the header (a kid that is no string, a bad crit) raise
        # InvalidTokenError, of which DecodeError is one kind.
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise Unauthenticated("the bearer token is not a well-formed JWT") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            # Which are accepted, not what was sent: the header is the caller's, unverified,
            # and anything at all (a secret pasted in the wrong place) would be answered and
            # logged.
            raise Unauthenticated(f"the token's algorithm is not accepted: {_ACCEPTED}")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the token names no signing key (kid)")
        # An iat that is no time (see _numeric_date) is taken as none here, and refused once
        # the signature verifies (step 2).
        issued_at = _numeric_date(unverified.get("iat"))
        if issued_at is not None and issued_at > time.time() + self.leeway:
            raise Unauthenticated("the token is not valid yet")
        issuer, key = self.keys.get(kid, issued_at, leeway=self.leeway)
        if key is None:
            raise Unauthenticated("the token is signed by a key the issuer does not publish")

        # 2. Signature, issuer, times and audience: any of them wrong is a 401, as Knative's
        # receivers answer (pkg/auth/verifier.go, verifyAuthN: go-oidc checks the audience).
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                issuer=issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            # PyJWT int()s the times before comparing them: true, false or a string of digits
            # is taken for a time (long past, or far ahead), though none is one (see below).
            claim = _no_time(unverified, ("exp",))
            raise Unauthenticated(_invalid(claim) if claim else "the token has expired") from None
        except jwt.ImmatureSignatureError:
            claim = _no_time(unverified, ("nbf", "iat"))
            refused = _invalid(claim) if claim else "the token is not valid yet"
            raise Unauthenticated(refused) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token is from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the token has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.InvalidAlgorithmError:  # the key published under its kid is of another kind
            raise Unauthenticated("the token's algorithm is not its signing key's") from None
        except jwt.InvalidTokenError as exc:
            claim = _invalid_claim(exc, unverified)
            if claim is None:
                raise Unauthenticated("the token is not valid") from None
            raise Unauthenticated(_invalid(claim)) from None

        # PyJWT int()s the times it checks: a string of digits or a boolean passes it, though
        # RFC 7519 (section 2) makes each a NumericDate, a JSON number.
        claim = _no_time(claims, ("exp", "nbf", "iat"))
        if claim is not None:
            raise Unauthenticated(_invalid(claim))
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if self.audience not in audiences:
            raise Unauthenticated(
                f"the token is not for this function (audience {self.audience!r})"
            )
        # 3. Who may call (Knative's verifyAuthZ: a subject no policy admits is a 403).
        subject = str(claims["sub"])
        if self.subjects and subject not in self.subjects:
            raise Forbidden(f"subject {subject!r} may not invoke this function")
        return subject


def _numeric_date(value: object) -> float | None:
    """``value`` as seconds since the epoch, or None where it is no NumericDate: anything but a
    JSON number (a boolean or a string of digits included), or a number no float holds.

    Python's JSON reads NaN, ±Infinity and integers of any length: none of them is a time, and
    an integer past a float's range would overflow the sums a time goes into.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _no_time(claims: dict[str, Any], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``claims`` holds and is no NumericDate, or None."""
    return next((n for n in names if n in claims and _numeric_date(claims[n]) is None), None)


def _invalid(claim: str) -> str:
    """A 401's message for a claim of the wrong kind."""
    return f"the token's {claim!r} claim is invalid"


def _invalid_claim(error: Exception, payload: dict[str, Any]) -> str | None:
    """The claim a PyJWT claim error is about, or None where it names none.

    PyJWT raises a class of its own for a bad ``sub``, ``iat``, ``jti`` or ``aud``, but a
    plain ``DecodeError`` for an ``exp`` or ``nbf`` that ``int()`` refuses (jwt/api_jwt.py:
    ``_validate_exp``, ``_validate_nbf``); the payload, read already, says which.
    """
    from jwt import exceptions

    by_class = {
        exceptions.InvalidSubjectError: "sub",
        exceptions.InvalidIssuedAtError: "iat",
        exceptions.InvalidJTIError: "jti",
        exceptions.InvalidAudienceError: "aud",
    }
    for kind, claim in by_class.items():
        if isinstance(error, kind):
            return claim
    if isinstance(error, exceptions.DecodeError):
        for claim in ("exp", "nbf"):
            if claim in payload:
                try:
                    int(payload[claim])
                except (ValueError, TypeError, OverflowError):
                    return claim
    return None
