"""One function's gate: who is calling, from the ``Authorization`` header alone."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from imagegen.auth.api_keys import ApiKeys
from imagegen.auth.callers import Caller, admit, bearer_token, credential_kind
from imagegen.auth.oidc import OidcVerifier, SigningKeys
from imagegen.errors import Unauthenticated
from imagegen.settings import Settings

__all__ = ["Authenticator", "Principal", "audience_for"]

# Longer than any service-account token or API key; refused before any parsing.
_MAX_TOKEN_CHARS = 16_384


def audience_for(function: str) -> str:
    """The audience a function accepts by default, and its Trigger's ``subscriber.audience``."""
    return f"imagegen-{function}"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``oidc`` with the token's subject, or an ``api-key``.

    ``subject`` never holds a secret: for an API key it names the key by its hash's prefix.
    """

    kind: Caller | Literal["anonymous"]
    subject: str

    def admit(self, callers: Collection[Caller], what: str) -> None:
        """Refuse this caller unless ``what`` accepts its kind of credential; ``anonymous``
        (authentication off) is admitted everywhere.

        Raises:
            Forbidden: an API key where only the broker's token is accepted (an event sink).
        """
        admit(self.kind, callers, what=what)


ANONYMOUS = Principal("anonymous", "")


class Authenticator:
    """Checks the bearer token of each invocation, when ``settings.auth_required``.

    A token with the three dot-separated parts of a JWT is verified as a Kubernetes OIDC
    token for ``audience``; anything else is looked up among the API keys.

    Args:
        settings: ``auth_*``, ``api_key_hashes`` and ``oidc_*``.
        function: The function's name; its audience is :func:`audience_for` it unless
            ``settings.auth_audience`` names another.
        keys: The issuer's keys (tests inject their own clock); default from the settings.
    """

    def __init__(
        self, settings: Settings, *, function: str, keys: SigningKeys | None = None
    ) -> None:
        self.required = settings.auth_required
        self.audience = settings.auth_audience or audience_for(function)
        self.api_keys = ApiKeys(settings.api_key_hashes)
        self.oidc = OidcVerifier(
            keys
            or SigningKeys(
                settings.oidc_discovery_url,
                ttl=settings.oidc_jwks_ttl,
                ca_file=settings.oidc_ca_file,
                token_file=settings.oidc_token_file,
            ),
            audience=self.audience,
            leeway=settings.oidc_clock_skew,
            subjects=list(settings.auth_subjects),
        )

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller named by an ``Authorization`` header value.

        Raises:
            Unauthenticated: no bearer token, or one that does not verify.
            Forbidden: a valid token of a subject not admitted.
            DependencyUnavailable: the issuer's keys cannot be fetched.
        """
        if not self.required:
            return ANONYMOUS
        token = bearer_token(authorization)
        if not token:
            raise Unauthenticated("a bearer token is required", error=None)
        if len(token) > _MAX_TOKEN_CHARS:
            raise Unauthenticated("the bearer token is too long")
        if credential_kind(token) == "oidc":
            return Principal("oidc", self.oidc.verify(token))
        matched = self.api_keys.match(token)
        if matched is None:
            raise Unauthenticated("the bearer token is not a valid API key or OIDC token")
        return Principal("api-key", "api-key:" + matched.removeprefix("sha256:")[:12])
