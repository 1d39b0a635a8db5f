"""Webhook messages: signed the Standard Webhooks way, sent only where it is safe to send.

Signing follows the Standard Webhooks specification (standard-webhooks/standard-webhooks,
``spec/standard-webhooks.md``): the signed content is ``{webhook-id}.{webhook-timestamp}.{body}``,
the signature ``v1,`` + base64(HMAC-SHA256(key, content)), the key the base64 text after
``whsec_``. Every configured secret signs (space-separated signatures), so a receiver holding
either the old or the new secret accepts messages while a secret is being rotated.

Server-side request forgery is refused before anything is sent: the URL's host is resolved once,
every address must be allowed, and the request goes to that vetted address (no second lookup a
DNS answer could change in between); redirects are never followed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.ledger.models import Delivery

__all__ = [
    "AddressPolicy",
    "WebhookFailed",
    "WebhookRefused",
    "WebhookSender",
    "sign",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata endpoints that are not link-local (those are refused as link-local anyway).
_METADATA = (
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS over IPv6
)


class WebhookRefused(InvalidRequest):
    """The webhook URL may not be called (scheme, host or address not allowed)."""

    code = "webhook_refused"


class WebhookFailed(DependencyUnavailable):
    """The receiver did not accept the message (network error, timeout, non-2xx)."""

    code = "webhook_failed"


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise InvalidRequest(
            "a webhook secret must be 'whsec_' followed by base64",
            errors=[{"field": "webhook_secrets", "message": "not whsec_<base64>"}],
        ) from None


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated."""
    content = f"{msg_id}.{timestamp}.{body}".encode()
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(_key(s), content, hashlib.sha256)).decode()
        for s in secrets
    )


@dataclass(frozen=True)
class AddressPolicy:
    """Which webhook hosts may be called.

    Args:
        allowed: Host names and networks (CIDR). Empty: any host with public addresses.
            Non-empty: only these hosts, or addresses in these networks. Loopback,
            link-local, private and cloud-metadata addresses are refused unless a network
            here contains them; naming a host does not unlock its private addresses.
    """

    allowed: tuple[str, ...] = ()

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        found = []
        for entry in self.allowed:
            try:
                found.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        return tuple(found)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(e.lower().rstrip(".") for e in self.allowed if not _is_network(e))

    def vet(self, url: str) -> tuple[httpx.URL, IPAddress]:
        """The URL and the one address to send to.

        Raises:
            WebhookRefused: the scheme, host or an address is not allowed.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused(f"webhook URL must be http(s) with a host: {url!r}")
        host = parts.hostname.lower().rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise WebhookFailed(f"webhook host {host!r} does not resolve: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        for address in addresses:
            self._check(host, address)
        return httpx.URL(url), addresses[0]

    def _check(self, host: str, address: IPAddress) -> None:
        if any(address in network for network in self.networks):
            return
        if not address.is_global or any(address in net for net in _METADATA):
            raise WebhookRefused(
                f"webhook host {host!r} resolves to {address}, a non-public address; "
                "allow its network to send there"
            )
        if self.allowed and host not in self.hosts:
            raise WebhookRefused(f"webhook host {host!r} is not on the allow-list")


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


class WebhookSender:
    """Sends one signed message to its vetted address; no retries here (see :mod:`.outbox`).

    Args:
        secrets: Standard Webhooks secrets (``whsec_…``); each signs every message.
        policy: Which hosts may be called.
        timeout: Seconds for connecting and for the whole reply.
    """

    def __init__(
        self, secrets: Sequence[str], policy: AddressPolicy, *, timeout: float = 10.0
    ) -> None:
        if not secrets:
            raise InvalidRequest(
                "webhooks need a signing secret",
                errors=[{"field": "webhook_secrets", "message": "at least one secret"}],
            )
        for secret in secrets:
            _key(secret)
        self._secrets = tuple(secrets)
        self.policy = policy
        # Redirects are never followed: a 3xx could point anywhere, vetted or not.
        self._client = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False)

    def headers(self, delivery: Delivery, timestamp: int | None = None) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt (signed now, unless told when)."""
        when = int(time.time()) if timestamp is None else timestamp
        return {
            "content-type": "application/json",
            "user-agent": "imagegen-ledger",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(when),
            "webhook-signature": sign(self._secrets, delivery.msg_id, when, delivery.payload),
        }

    def send(self, delivery: Delivery) -> int:
        """POST ``delivery``; returns the receiver's 2xx status.

        Raises:
            WebhookRefused: the URL may not be called (a retry cannot help).
            WebhookFailed: no 2xx reply (a retry may help).
        """
        url, address = self.policy.vet(delivery.url)
        host = url.host
        target = url.copy_with(host=str(address))
        extensions: dict[str, Any] = {}
        if url.scheme == "https":
            # TLS still checks the certificate against the name, not the address.
            extensions["sni_hostname"] = host
        headers = self.headers(delivery)
        headers["host"] = url.netloc.decode("ascii")
        try:
            reply = self._client.post(
                target, content=delivery.payload, headers=headers, extensions=extensions
            )
        except httpx.HTTPError as exc:
            raise WebhookFailed(f"{type(exc).__name__}: {exc}") from None
        if 300 <= reply.status_code < 400:
            raise WebhookFailed(f"HTTP {reply.status_code}: redirect not followed")
        if not 200 <= reply.status_code < 300:
            raise WebhookFailed(f"HTTP {reply.status_code}")
        return reply.status_code

    def close(self) -> None:
        self._client.close()
