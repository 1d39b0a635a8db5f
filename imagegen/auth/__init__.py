"""Who may invoke a function: Kubernetes-issued OIDC tokens and API keys, as bearer tokens.

Knative Eventing, with its ``authentication-oidc`` feature on, sends every event with
``Authorization: Bearer <JWT>``: a service-account token the Kubernetes API server issued for
the audience the Trigger's ``subscriber.audience`` names (``knative/eventing``,
``pkg/auth/token_provider.go``). :class:`Authenticator` verifies it the way Knative's own
receivers do (``pkg/auth/verifier.go``): issuer and keys from the discovery document at
``oidc_discovery_url``, signature, expiry, then the audience. Platform services that call a
function directly use API keys instead, kept only as SHA-256 hashes (``api_key_hashes``).
Which of the two a route accepts, each stage declares (:mod:`imagegen.auth.callers`): the event
sinks take the broker's token only.

PyJWT does the JOSE work; nothing here is hand-written cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen.auth.api_keys import hash_api_key, new_api_key
    from imagegen.auth.authenticator import Authenticator, Principal, audience_for
    from imagegen.auth.callers import ANY_CALLER, BROKER, Caller
    from imagegen.auth.oidc import OidcVerifier, SigningKeys

# Each name from its module on first use: ``python -m imagegen.auth.api_keys`` then runs a
# module the package has not imported already (which runpy warns of).
_HOMES = {
    "ANY_CALLER": "callers",
    "BROKER": "callers",
    "Authenticator": "authenticator",
    "Caller": "callers",
    "OidcVerifier": "oidc",
    "Principal": "authenticator",
    "SigningKeys": "oidc",
    "audience_for": "authenticator",
    "hash_api_key": "api_keys",
    "new_api_key": "api_keys",
}

__all__ = [
    "ANY_CALLER",
    "BROKER",
    "Authenticator",
    "Caller",
    "OidcVerifier",
    "Principal",
    "SigningKeys",
    "audience_for",
    "hash_api_key",
    "new_api_key",
]


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
