"""Which kinds of credential a route accepts: the broker's OIDC token, an API key, or either.

A stage declares it for ``POST /`` and for each of its routes (:attr:`Stage.callers
<imagegen.stages.Stage.callers>`, :attr:`Route.callers <imagegen.stages.Route.callers>`), and the
caller, once authenticated, is checked against it (:func:`admit`). The event sinks, the ledger's
``POST /`` and the dead-letter sink's, take the broker's token only: an API key is given to a
platform service to call a stage or query the ledger, and every function reads the same keys,
so a key accepted there would let its holder write any event into a generation's record.

Light on purpose: the stage registry imports it to declare its defaults.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

from imagegen.errors import Forbidden

__all__ = ["ANY_CALLER", "BROKER", "Caller", "admit", "bearer_token", "credential_kind"]

Caller = Literal["oidc", "api-key"]
"""A kind of credential: a Kubernetes OIDC token for the function's audience, or an API key."""

ANY_CALLER: frozenset[Caller] = frozenset({"oidc", "api-key"})
"""The default: the broker's token, or a platform service's API key."""

BROKER: frozenset[Caller] = frozenset({"oidc"})
"""The broker's OIDC token only: what an event sink accepts."""

_NAMES: dict[str, str] = {"oidc": "an OIDC token for its audience", "api-key": "an API key"}


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` value; empty when there is none."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def credential_kind(token: str) -> Caller:
    """What a bearer token is checked as: the three dot-separated parts of a JWT are an OIDC
    token, anything else an API key."""
    return "oidc" if token.count(".") == 2 else "api-key"


def admit(kind: str, callers: Collection[Caller], *, what: str) -> None:
    """Refuse a caller whose kind of credential ``what`` does not accept.

    Args:
        kind: The authenticated caller's :attr:`~imagegen.auth.Principal.kind`; ``anonymous``
            (authentication off, in dev) is always admitted.
        callers: The kinds ``what`` accepts.
        what: The route, as a refusal names it (``POST / of ledger``).

    Raises:
        Forbidden: a valid credential of a kind ``callers`` leaves out.
    """
    if kind == "anonymous" or kind in callers:
        return
    accepted = " or ".join(_NAMES[c] for c in sorted(callers)) or "no credential"
    message = f"{what} does not accept {_NAMES.get(kind, kind)}, only {accepted}"
    if kind == "api-key":
        message += (
            ": API keys may call the stages and the ledger's query and replay API, not write"
            " events (the broker delivers those)"
        )
    raise Forbidden(message)
