"""Public and signed URLs of hosted images.

The Worker in ``worker/`` serves the objects the persist stage writes; this module builds the
URLs it accepts. The signing scheme is specified in ``docs/signed-urls.md`` and pinned by the
test vectors in ``schemas/signed-url-vectors.json``, which the Worker's tests read too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from urllib.parse import urlencode

from imagegen.errors import InvalidRequest

__all__ = [
    "DEFAULT_TTL",
    "PUBLIC_KEY_PATTERN",
    "is_public_key",
    "public_url",
    "sign",
    "verify",
]

DEFAULT_TTL = 7 * 24 * 3600
"""Lifetime of a signed URL, in seconds, when none is given (one week)."""

# Same expression as KEY_PATTERN in worker/src/keys.ts: a day folder, a generation id without
# dots, then the full image or its thumbnail. The metadata record (.json) is deliberately absent.
PUBLIC_KEY_PATTERN = re.compile(
    r"\A[0-9]{4}/(?:0[1-9]|1[0-2])/(?:0[1-9]|[12][0-9]|3[01])"
    r"/[A-Za-z0-9][A-Za-z0-9_-]{0,127}(?:\.png|\.thumb\.webp)\Z"
)


def is_public_key(key: str) -> bool:
    """Whether ``key`` names an object the Worker serves (a full image or a thumbnail)."""
    return PUBLIC_KEY_PATTERN.match(key) is not None


def _message(key: str, expires: int) -> bytes:
    return f"/{key}\n{expires}".encode()


def sign(key: str, expires: int, secret: str) -> str:
    """The signature of ``key`` valid until ``expires``.

    Args:
        key: The object key relative to the storage prefix, without a leading slash.
        expires: Unix time in seconds after which the signature is refused.
        secret: The secret shared with the Worker (``SIGNING_SECRET``).

    Returns:
        Lowercase hex of HMAC-SHA256(secret, "/" + key + "\\n" + expires).
    """
    return hmac.new(secret.encode(), _message(key, expires), hashlib.sha256).hexdigest()


def verify(key: str, expires: int, signature: str, secret: str, *, now: int | None = None) -> bool:
    """Whether ``signature`` signs ``key`` and ``expires`` has not passed.

    Args:
        key: The object key relative to the storage prefix.
        expires: Unix time in seconds carried by the URL.
        signature: The hex signature carried by the URL.
        secret: The shared secret.
        now: The current Unix time; the clock when omitted.
    """
    current = int(time.time()) if now is None else now
    expected = sign(key, expires, secret)
    # Compare before looking at the clock so timing does not reveal which check failed.
    matches = hmac.compare_digest(expected.encode(), signature.encode())
    return matches and current <= expires


def public_url(
    base_url: str,
    key: str,
    *,
    secret: str | None = None,
    ttl: int = DEFAULT_TTL,
    now: int | None = None,
) -> str:
    """The URL at which the Worker serves ``key``.

    Args:
        base_url: ``IMAGEGEN_PUBLIC_BASE_URL``; a trailing slash is tolerated.
        key: The object key relative to the storage prefix, e.g. ``2026/05/01/abc.png``.
        secret: When given, the URL is signed and expires ``ttl`` seconds after ``now``.
        ttl: Lifetime of a signed URL in seconds.
        now: The current Unix time; the clock when omitted.

    Returns:
        ``<base>/<key>``, followed by ``?expires=..&signature=..`` when signed.

    Raises:
        InvalidRequest: ``key`` is not a served key shape, ``base_url`` is empty, or ``ttl``
            is not positive.
    """
    errors: list[dict[str, str]] = []
    if not base_url.strip("/"):
        errors.append({"field": "base_url", "message": "must not be empty"})
    if not is_public_key(key):
        errors.append(
            {
                "field": "key",
                "message": "must look like YYYY/MM/DD/<generation-id>.png or .thumb.webp",
            }
        )
    if secret is not None and ttl <= 0:
        errors.append({"field": "ttl", "message": "must be a positive number of seconds"})
    if errors:
        raise InvalidRequest("cannot build a public URL", errors=errors)

    url = f"{base_url.rstrip('/')}/{key}"
    if secret is None:
        return url
    expires = (int(time.time()) if now is None else now) + ttl
    query = urlencode({"expires": expires, "signature": sign(key, expires, secret)})
    return f"{url}?{query}"
