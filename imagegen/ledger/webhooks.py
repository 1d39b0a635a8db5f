"""Webhook messages: signed the Standard Webhooks way, sent only where it is safe to send.

Signing follows the Standard Webhooks specification (standard-webhooks/standard-webhooks,
``spec/standard-webhooks.md``): the signed content is ``{webhook-id}.{webhook-timestamp}.{body}``,
the signature ``v1,`` + base64(HMAC-SHA256(key, content)), the key the base64 text after
``whsec_``. Every configured secret signs (space-separated signatures), so a receiver holding
either the old or the new secret accepts messages while a secret is being rotated.

Server-side request forgery is refused before anything is sent: the URL's host is resolved once,
every address must be allowed, and the request goes to that vetted address (no second lookup a
DNS answer could change in between); redirects are never followed. An IPv6 address that carries
an IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4) is judged by the IPv4 address it
reaches.

Each attempt has one deadline for connecting, sending and the reply's status line and headers
(the body is never read), kept by asyncio's cancellation: httpx's own timeouts bound each read,
and a receiver trickling its reply a byte at a time would never trip them.

A reply other than 2xx is answered as the specification's "Delivery success and failure" asks:
``410 Gone`` ends the message (:class:`WebhookGone`); any other failure carries its status and
the reply's ``Retry-After`` (:func:`imagegen._retry_after.retry_after`) for the dispatcher to
schedule by.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from imagegen._retry_after import RETRY_AFTER_MAX, retry_after
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.ledger.models import Delivery
from imagegen.settings import webhook_key

__all__ = [
    "AddressPolicy",
    "WebhookFailed",
    "WebhookGone",
    "WebhookRefused",
    "WebhookSender",
    "receiver",
    "sign",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud metadata endpoints that are not link-local (those are refused as link-local anyway).
_METADATA = (
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS over IPv6
    # Local-use NAT64 (RFC 8215): an operator's own translator, to wherever it reaches;
    # Python before 3.12.4 counts it as global.
    ipaddress.ip_network("64:ff9b:1::/48"),
)
# IPv6 prefixes whose last 32 bits are the IPv4 address reached: the NAT64 well-known prefix
# (RFC 6052, section 2.1), IPv4-compatible addresses (RFC 4291, section 2.5.5.1, deprecated
# but still connected to as IPv4 by some stacks) and IPv4-translated ones (RFC 2765, SIIT).
_IPV4_IN_LAST_32 = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
)

# Standard Webhooks (standard-webhooks/standard-webhooks, spec/standard-webhooks.md, "Delivery
# success and failure"): 429 means a rate limit was met, 502 and 504 a receiver under load;
# "it's recommended to throttle" all three, so they are not tried again at once.
_THROTTLE = frozenset({429, 502, 504})


class WebhookRefused(InvalidRequest):
    """The webhook URL may not be called (scheme, host or address not allowed)."""

    code = "webhook_refused"


class WebhookGone(WebhookRefused):
    """The receiver answered 410 Gone: it wants no more messages at this URL."""

    code = "webhook_gone"


class WebhookFailed(DependencyUnavailable):
    """The receiver did not accept the message (network error, timeout, non-2xx).

    Args:
        message: What went wrong.
        status: The reply's status; None when there was no reply.
        retry_after: Seconds the reply's ``Retry-After`` asked to wait; None when it asked
            for nothing (or nothing readable).
    """

    code = "webhook_failed"

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # what the receiver asked for, not a default
        self.status_code = status

    @property
    def throttled(self) -> bool:
        """Whether the receiver asked to be sent less (429, 502, 504, or a ``Retry-After``):
        no try before the next round, and that round not before ``retry_after``."""
        return self.status_code in _THROTTLE or self.retry_after is not None


def _key(secret: str) -> bytes:
    try:
        return webhook_key(secret)
    except ValueError as exc:
        raise InvalidRequest(
            str(exc), errors=[{"field": "webhook_secrets", "message": str(exc)}]
        ) from None


# The port an http(s) URL reaches when it names none.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_name(name: str) -> str:
    """A host name as it is resolved and compared: in lower case, without the trailing dots
    that make a DNS name fully qualified (``example.com.`` is ``example.com``)."""
    return name.lower().rstrip(".")


def receiver(url: str) -> str:
    """Who a webhook message goes to, as the sender reaches it: ``scheme://host[:port]``.

    The scheme and host in lower case, the host as :func:`_host_name` has it (an IPv6 address
    in brackets), the port only where it is not the scheme's own (80, 443); never the
    user-info, path, query or fragment, which do not change where a message goes (and may
    hold the caller's token). One receiver is sent one message at a time, and a log line
    names it so.

    Raises:
        ValueError: ``url`` is no http(s) URL with a host, or its port or IPv6 brackets are
            malformed.
    """
    parts = urlsplit(url)
    port = parts.port  # ValueError: out of range, or no number
    host = _host_name(parts.hostname or "")
    if parts.scheme not in _DEFAULT_PORTS or not host:
        raise ValueError("not an http(s) URL with a host")
    if ":" in host:
        host = f"[{host}]"
    named = f"{parts.scheme}://{host}"
    return named if port in (None, _DEFAULT_PORTS[parts.scheme]) else f"{named}:{port}"


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
        return frozenset(_host_name(e) for e in self.allowed if not _is_network(e))

    def vet(self, url: str, *, timeout: float | None = None) -> tuple[httpx.URL, list[IPAddress]]:
        """The URL and the addresses to send to, in the resolver's order, each one allowed.

        Args:
            url: The webhook URL.
            timeout: Seconds the resolver may take (None: its own limits, tens of seconds
                where a name server does not answer).

        Raises:
            WebhookRefused: the scheme, host or an address is not allowed.
            WebhookFailed: the host does not resolve, or not within ``timeout``.
        """
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise WebhookRefused(f"webhook URL must be http(s) with a host: {url!r}")
        host = _host_name(parts.hostname)
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        # Not a name DNS can carry (an empty label, one over 63 characters, a name over 253):
        # no retry can help.
        unusable = WebhookRefused(f"webhook host {host[:100]!r} is not a valid host name")
        if len(host) > 253:
            raise unusable
        try:
            host.encode("idna")  # what the resolver would refuse, found without asking it
        except UnicodeError:
            raise unusable from None
        if timeout is not None and timeout <= 0:
            raise WebhookFailed("no time left for an attempt before the claim's lease ends")
        try:
            infos = _resolve(host, port, timeout)
        except TimeoutError:
            raise WebhookFailed(
                f"webhook host {host!r} did not resolve within {timeout:.3g} s"
            ) from None
        except socket.gaierror as exc:
            raise WebhookFailed(f"webhook host {host!r} does not resolve: {exc}") from None
        except (UnicodeError, ValueError):  # the IDNA codec's refusal
            raise unusable from None
        found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        addresses = list(dict.fromkeys(found))
        for address in addresses:
            self._check(host, address)
        return httpx.URL(url), addresses

    def _check(self, host: str, address: IPAddress) -> None:
        embedded = _embedded_ipv4(address)
        if any(a in net for a in (address, embedded) if a for net in self.networks):
            return
        if not _public(embedded or address):
            raise WebhookRefused(
                f"webhook host {host!r} resolves to {address}, a non-public address; "
                "allow its network to send there"
            )
        if self.allowed and host not in self.hosts:
            raise WebhookRefused(f"webhook host {host!r} is not on the allow-list")


def _resolve(host: str, port: int, timeout: float | None) -> list[Any]:
    """``socket.getaddrinfo`` of ``host``, given up after ``timeout`` seconds.

    The resolver cannot be interrupted: it goes on in a daemon thread of its own, and its
    answer, when it comes, is dropped.
    """
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    outcome: list[Any] = []

    def resolve() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=resolve, name="imagegen-webhook-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout))
    if not outcome:
        raise TimeoutError
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return list(outcome[0])


def _public(address: IPAddress) -> bool:
    if address.is_multicast or not address.is_global:
        return False
    return not any(address in net for net in _METADATA)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 ``address`` reaches, when it carries one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in prefix for prefix in _IPV4_IN_LAST_32):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


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
        timeout: Seconds an attempt may take in all: connecting, sending, the reply's status.
    """

    def __init__(
        self, secrets: Sequence[str], policy: AddressPolicy, *, timeout: float = 15.0
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
        self.timeout = timeout
        # Loading the CA bundle is the slow part of a client: once, for every attempt.
        self._tls: ssl.SSLContext = httpx.create_ssl_context()

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

    def send(self, delivery: Delivery, *, deadline: float | None = None) -> int:
        """POST ``delivery``; returns the receiver's 2xx status.

        Args:
            delivery: The message.
            deadline: ``time.monotonic()`` by which the attempt ends, when sooner than
                ``timeout`` from now (the dispatcher's lease on the message).

        Raises:
            WebhookGone: the receiver answered 410 (a retry cannot help).
            WebhookRefused: the URL may not be called (a retry cannot help).
            WebhookFailed: no 2xx reply in time (a retry may help); with the reply's status
                and ``Retry-After`` when there was one.
        """
        budget = self.timeout
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        ends = time.monotonic() + budget
        # The name is resolved within the attempt's time too: a name server that does not
        # answer must not hold the attempt past the claim's lease.
        url, addresses = self.policy.vet(delivery.url, timeout=budget)
        extensions: dict[str, Any] = {}
        if url.scheme == "https":
            # TLS still checks the certificate against the name, not the address.
            extensions["sni_hostname"] = url.host
        headers = self.headers(delivery)
        headers["host"] = url.netloc.decode("ascii")
        # Each address in turn while none can be connected to (an IPv6 address first where
        # the pod has no IPv6 route, one server of several down): nothing was sent to it.
        # One that drops the SYNs never refuses: its connect may take only its share of what
        # is left (the last address all of it), so the others are still tried within the
        # attempt, as a client's "Happy Eyeballs" (RFC 8305, section 5) moves on by a timer.
        for index, address in enumerate(addresses):
            target = url.copy_with(host=str(address))
            left = ends - time.monotonic()
            connect = left / (len(addresses) - index)
            try:
                status, wait = asyncio.run(
                    self._post(target, headers, delivery.payload, extensions, left, connect)
                )
                break
            except TimeoutError:
                raise WebhookFailed(f"no reply within {budget:.3g} s") from None
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if index + 1 < len(addresses) and ends - time.monotonic() > 0:
                    continue
                if isinstance(exc, httpx.ConnectTimeout):
                    raise WebhookFailed(f"no connection within {budget:.3g} s") from None
                raise WebhookFailed(f"ConnectError: {exc}") from None
            except httpx.HTTPError as exc:
                raise WebhookFailed(f"{type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return status
        # Standard Webhooks (spec/standard-webhooks.md, "Delivery success and failure"):
        # 410 Gone says the receiver is "no longer interested in receiving webhooks from this
        # source", and the sender should "stop sending it messages".
        if status == 410:
            raise WebhookGone("HTTP 410: the receiver is gone; the message is not sent again")
        reason = (
            f"HTTP {status}: redirect not followed" if 300 <= status < 400 else f"HTTP {status}"
        )
        # "Some responses may also include a Retry-After header (e.g. 503 Service Unavailable),
        # which should be taken into consideration when scheduling the next attempt."
        if wait is not None:
            reason += f", Retry-After {wait:.0f} s"
            if wait >= RETRY_AFTER_MAX:  # read as a day at most: a longer wait asked is said
                reason += " or more"
        raise WebhookFailed(reason, status=status, retry_after=wait)

    async def _post(
        self,
        target: httpx.URL,
        headers: dict[str, str],
        body: str,
        extensions: dict[str, Any],
        budget: float,
        connect: float,
    ) -> tuple[int, float | None]:
        """The reply's status and ``Retry-After`` wait, all within ``budget`` seconds (asyncio
        cancels the rest), the connection made within ``connect`` of them."""
        async with (
            asyncio.timeout(budget),
            # Redirects are never followed: a 3xx could point anywhere, vetted or not.
            httpx.AsyncClient(
                timeout=httpx.Timeout(budget, connect=connect),
                verify=self._tls,
                follow_redirects=False,
                trust_env=False,
            ) as client,
            # Only the status line and headers are read: the body says nothing the ledger
            # uses, and a receiver may make it as long or as slow as it likes.
            client.stream(
                "POST", target, content=body, headers=headers, extensions=extensions
            ) as reply,
        ):
            return reply.status_code, retry_after(reply.headers.get("retry-after"))

    def close(self) -> None:
        """Nothing to release: each attempt opens and closes its own connection."""
