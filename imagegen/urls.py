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
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from imagegen.errors import InvalidRequest

__all__ = [
    "DEFAULT_TTL",
    "GALLERY_PATH_PATTERN",
    "PUBLIC_KEY_PATTERN",
    "canonical_query",
    "gallery_url",
    "is_public_key",
    "public_url",
    "sign",
    "verify",
]

DEFAULT_TTL = 7 * 24 * 3600
"""Lifetime of a signed URL, in seconds, when none is given (one week)."""

# Same expression as KEY_PATTERN in worker/src/keys.ts: a day folder, a generation id without
# dots, then the full image, its thumbnail or an AVIF/WebP derivative of a given width. The
# metadata record (.json) is deliberately absent.
PUBLIC_KEY_PATTERN = re.compile(
    r"\A[0-9]{4}/(?:0[1-9]|1[0-2])/(?:0[1-9]|[12][0-9]|3[01])"
    r"/[A-Za-z0-9][A-Za-z0-9_-]{0,127}(?:\.png|\.thumb\.webp|\.w[1-9][0-9]{0,4}\.(?:avif|webp))\Z"
)

# Same expression as GALLERY_PATTERN in worker/src/keys.ts: the gallery's latest day ("") or
# one day ("YYYY/MM/DD/"), as signed in a private gallery link.
GALLERY_PATH_PATTERN = re.compile(
    r"\A(?:[0-9]{4}/(?:0[1-9]|1[0-2])/(?:0[1-9]|[12][0-9]|3[01])/)?\Z"
)

# Parameters that carry the signature itself and are never signed.
_SIGNATURE_PARAMS = frozenset({"expires", "signature"})


def is_public_key(key: str) -> bool:
    """Whether ``key`` names an object the Worker serves (a full image, thumbnail or derivative)."""
    return PUBLIC_KEY_PATTERN.match(key) is not None


def canonical_query(params: Mapping[str, str | int]) -> str:
    """The signed form of request parameters: sorted, RFC 3986 percent-encoded, ``&``-joined.

    ``expires`` and ``signature`` are left out (they carry the signature).
    """
    pairs = sorted(
        (quote(name, safe="-._~"), quote(str(value), safe="-._~"))
        for name, value in params.items()
        if name not in _SIGNATURE_PARAMS
    )
    return "&".join(f"{name}={value}" for name, value in pairs)


def _message(key: str, expires: int, params: Mapping[str, str | int] | None) -> bytes:
    query = canonical_query(params or {})
    path = f"/{key}?{query}" if query else f"/{key}"
    return f"{path}\n{expires}".encode()


def sign(
    key: str, expires: int, secret: str, *, params: Mapping[str, str | int] | None = None
) -> str:
    """The signature of ``key`` (and its ``params``) valid until ``expires``.

    Args:
        key: The object key relative to the storage prefix, without a leading slash (or a
            gallery path: ``""`` or ``YYYY/MM/DD/``).
        expires: Unix time in seconds after which the signature is refused.
        secret: The secret shared with the Worker (``SIGNING_SECRET``).
        params: Request parameters the URL carries besides the signature, such as ``w``.

    Returns:
        Lowercase hex of HMAC-SHA256(secret, "/" + key + ["?" + canonical query] + "\\n" +
        expires).
    """
    message = _message(key, expires, params)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    key: str,
    expires: int,
    signature: str,
    secret: str,
    *,
    now: int | None = None,
    params: Mapping[str, str | int] | None = None,
) -> bool:
    """Whether ``signature`` signs ``key`` and ``expires`` has not passed.

    Args:
        key: The object key relative to the storage prefix.
        expires: Unix time in seconds carried by the URL.
        signature: The hex signature carried by the URL.
        secret: The shared secret.
        now: The current Unix time; the clock when omitted.
        params: The other request parameters the URL carries.
    """
    current = int(time.time()) if now is None else now
    expected = sign(key, expires, secret, params=params)
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
    width: int | None = None,
) -> str:
    """The URL at which the Worker serves ``key``.

    Args:
        base_url: ``IMAGEGEN_PUBLIC_BASE_URL``; a trailing slash is tolerated.
        key: The object key relative to the storage prefix, e.g. ``2026/05/01/abc.png``.
        width: Asks for the narrowest derivative at least this wide (the ``w`` parameter; only
            for a ``.png`` key).
        secret: When given, the URL is signed and expires ``ttl`` seconds after ``now``.
        ttl: Lifetime of a signed URL in seconds.
        now: The current Unix time; the clock when omitted.

    Returns:
        ``<base>/<key>``, followed by ``?expires=..&signature=..`` when signed.

    Raises:
        InvalidRequest: ``key`` is not a served key shape, ``base_url`` is not an origin
            (``https://host[:port]``, as ``IMAGEGEN_PUBLIC_BASE_URL`` must be), ``width`` is
            not a whole number from 1 to ``MAX_WIDTH`` on a ``.png`` key, or, when signing,
            ``secret`` is not one ``IMAGEGEN_URL_SIGNING_SECRET`` may be (16 bytes or more,
            no whitespace around it), ``ttl`` is not a whole number of seconds from 1 to
            ten years or ``now`` not a whole number of seconds from 0.
    """
    errors: list[dict[str, str]] = []
    if not is_public_key(key):
        errors.append(
            {
                "field": "key",
                "message": "must look like YYYY/MM/DD/<generation-id>.png, .thumb.webp, "
                ".w<width>.avif or .w<width>.webp",
            }
        )
    if width is not None and not (
        _is_whole(width) and 1 <= width <= MAX_WIDTH and key.endswith(".png")
    ):
        errors.append(
            {
                "field": "width",
                "message": f"a whole number of pixels, 1 to {MAX_WIDTH}, and only for a .png key",
            }
        )
    base_url = _check_signing(errors, base_url, secret, ttl, now)
    params = {} if width is None else {"w": str(width)}
    return _url(f"{base_url.rstrip('/')}/{key}", key, params, secret, ttl, now)


def gallery_url(
    base_url: str,
    day: str = "",
    *,
    secret: str | None = None,
    ttl: int = DEFAULT_TTL,
    now: int | None = None,
) -> str:
    """The URL of the Worker's gallery: the latest day, or ``day`` (``YYYY/MM/DD``).

    With ``secret``, the link is signed: a private Worker shows its gallery only through such a
    link (``GALLERY=signed``), and it opens what it names until it expires. A link for ``day``
    opens that day's pages and no other day; one for the latest day (no ``day``) opens every
    day. The page's image URLs are signed an hour longer (``IMAGE_GRACE`` in
    ``worker/src/gallery.ts``), as its images load lazily (docs/signed-urls.md, "Gallery").

    Raises:
        InvalidRequest: ``day`` is not a date path, or ``base_url``, ``secret``, ``ttl`` or
            ``now`` is one :func:`public_url` refuses.
    """
    path = f"{day.strip('/')}/" if day.strip("/") else ""
    errors: list[dict[str, str]] = []
    if not GALLERY_PATH_PATTERN.match(path):
        errors.append({"field": "day", "message": "must look like YYYY/MM/DD"})
    base_url = _check_signing(errors, base_url, secret, ttl, now)
    return _url(f"{base_url.rstrip('/')}/{path}", path, {}, secret, ttl, now)


MAX_WIDTH = 8192
"""The largest ``w`` the Worker accepts."""


# The Worker reads an ``expires`` of 15 digits at most (``EXPIRES_PATTERN`` in
# worker/src/signing.ts): a ``now`` up to this (three million years on) plus a lifetime of at
# most MAX_SIGNED_URL_TTL stays within them, and one below 0 would write a minus sign.
_MAX_NOW = 10**14


def _is_whole(value: object) -> bool:
    """Whether ``value`` is an int written as digits alone: the Worker takes ``w`` and
    ``expires`` only so, and ``str()`` of a bool or float is not (``True``, ``512.0``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_signing(
    errors: list[dict[str, str]], base_url: str, secret: str | None, ttl: int, now: int | None
) -> str:
    """Adds to ``errors`` what the Worker would refuse in a URL built from these, and raises
    them all; the limits are the settings' own, so a URL built by hand (re-issued after a
    secret leaked) meets the rules persist's URLs meet. Returns ``base_url`` as the settings
    keep it, written as browsers write it (``https://IMG.example.com:443`` as
    ``https://img.example.com``): a URL built by hand is the one persist wrote."""
    # Imported here: the settings and pydantic take a tenth of a second to import; this
    # module alone takes next to nothing.
    from pydantic import SecretStr

    from imagegen.settings import MAX_SIGNED_URL_TTL, _served_base_url, _signing_secret

    served = base_url
    if not base_url.strip("/"):
        errors.insert(0, {"field": "base_url", "message": "must not be empty"})
    else:
        try:
            served = _served_base_url(base_url) or base_url
        except ValueError as exc:
            errors.insert(0, {"field": "base_url", "message": str(exc)})
    if secret is not None:
        try:
            _signing_secret(SecretStr(secret))
        except ValueError as exc:
            errors.append({"field": "secret", "message": str(exc)})
    if secret is not None and not (_is_whole(ttl) and 0 < ttl <= MAX_SIGNED_URL_TTL):
        errors.append(
            {
                "field": "ttl",
                "message": f"must be a whole number of seconds from 1 to {MAX_SIGNED_URL_TTL}"
                " (ten years)",
            }
        )
    if secret is not None and now is not None and not (_is_whole(now) and 0 <= now <= _MAX_NOW):
        errors.append(
            {"field": "now", "message": f"must be a whole number of seconds from 0 to {_MAX_NOW}"}
        )
    if errors:
        raise InvalidRequest("cannot build a public URL", errors=errors)
    return served


def _url(
    url: str,
    key: str,
    params: dict[str, str],
    secret: str | None,
    ttl: int,
    now: int | None,
) -> str:
    if secret is None:
        return f"{url}?{urlencode(params)}" if params else url
    expires = (int(time.time()) if now is None else now) + ttl
    signature = sign(key, expires, secret, params=params)
    return f"{url}?{urlencode({**params, 'expires': expires, 'signature': signature})}"
