"""API keys: random bearer tokens, stored only as SHA-256 hashes.

A key is 256 random bits, so a plain SHA-256 is as good as a slow password hash here: there is
nothing to guess. Several hashes may be valid at once, which is how keys rotate: add the new
hash, move the callers, remove the old one.

    python -m imagegen.auth.api_keys      # prints a new key and the hash to configure
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Sequence

from imagegen.errors import InvalidRequest

__all__ = ["PREFIX", "ApiKeys", "hash_api_key", "malformed_hashes", "new_api_key"]

PREFIX = "igk_"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def new_api_key() -> tuple[str, str]:
    """A fresh key and its hash: give the key to the caller, configure the hash."""
    key = PREFIX + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


def hash_api_key(key: str) -> str:
    """``sha256:<hex>`` of ``key``, the form ``api_key_hashes`` holds."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def malformed_hashes(hashes: Sequence[str]) -> str | None:
    """Why ``hashes`` are not all key hashes (``sha256:<64 hex digits>``, in any case, blank
    entries skipped): the first entry that is none, by its place (``entry 2 of 3``, counted
    from 1 among all given), never its text; None when each is one."""
    for number, entry in enumerate(hashes, start=1):
        text = entry.strip().lower()
        if not text or _HASH.fullmatch(text):
            continue
        if text.startswith(PREFIX):  # the key pasted where its hash belongs
            return (
                f"entry {number} of {len(hashes)} is an API key, not its hash: configure its"
                " sha256:<64 hex digits> hash"
            )
        return f"entry {number} of {len(hashes)} is not sha256:<64 hex digits>"
    return None


class ApiKeys:
    """The accepted key hashes.

    Raises:
        InvalidRequest: naming ``api_key_hashes`` when an entry is not ``sha256:<64 hex>``
            (the settings refuse such an entry already, as :func:`malformed_hashes` says it).
    """

    def __init__(self, hashes: Iterable[str]) -> None:
        given = list(hashes)
        if (problem := malformed_hashes(given)) is not None:
            raise InvalidRequest(
                "api_key_hashes: each entry must be sha256:<64 hex digits>",
                errors=[{"field": "api_key_hashes", "message": problem}],
            )
        self._hashes = [h.strip().lower() for h in given if h.strip()]

    def __bool__(self) -> bool:
        return bool(self._hashes)

    def match(self, key: str) -> str | None:
        """The hash ``key`` matches, or None; compares with every entry in constant time."""
        presented = hash_api_key(key)
        found = None
        for stored in self._hashes:
            if hmac.compare_digest(presented, stored):
                found = stored
        return found


if __name__ == "__main__":
    key, digest = new_api_key()
    print(f"key:  {key}\nhash: {digest}")
