"""Who may invoke a function: Kubernetes-issued OIDC tokens and API keys, as bearer tokens.

Knative Eventing, with its ``authentication-oidc`` feature on, sends every event with
``Authorization: Bearer <JWT>``: a service-account token the Kubernetes API server issued for
the audience the Trigger's ``subscriber.audience`` names (``knative/eventing``,
``pkg/auth/token_provider.go``). :class:`Authenticator` verifies it the way Knative's own
receivers do (``pkg/auth/verifier.go``): issuer and keys from the discovery document at
``oidc_discovery_url``, signature, expiry, then the audience. Platform services that call a
function directly use API keys instead, kept only as SHA-256 hashes (``api_key_hashes``).

PyJWT does the JOSE work; nothing here is hand-written cryptography.
"""

from __future__ import annotations

from imagegen.auth.api_keys import hash_api_key, new_api_key
from imagegen.auth.authenticator import Authenticator, Principal, audience_for
from imagegen.auth.oidc import OidcVerifier, SigningKeys

__all__ = [
    "Authenticator",
    "OidcVerifier",
    "Principal",
    "SigningKeys",
    "audience_for",
    "hash_api_key",
    "new_api_key",
]
