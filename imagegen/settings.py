"""Configuration: one settings class, read once from the environment.

Precedence, highest first: arguments passed to ``Settings(...)``, environment variables
(``IMAGEGEN_*``; ``OLLAMA_HOST`` too), a ``.env`` file in the working directory, then the
defaults of the profile (``IMAGEGEN_PROFILE=dev|prod``), then the defaults below. List settings
accept JSON (``["US","DE"]``) or comma-separated text (``US,DE``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagegen._paths import expanded
from imagegen.auth.api_keys import malformed_hashes
from imagegen.models import (
    MAX_ENHANCER_CHARS,
    MAX_LORA_PATH_CHARS,
    MAX_MODEL_CHARS,
    MAX_PLUGIN_NAME_CHARS,
    MAX_PLUGINS,
)
from imagegen.modelspec import DEFAULT_MODEL, spec_for

__all__ = ["DEFAULT_MODEL", "PROFILE_DEFAULTS", "Settings", "webhook_key"]

# Only what truly differs between a laptop/dev namespace and production.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    # dev: prompts in logs help debugging; any device will do.
    "dev": {"log_prompts": True, "device": "auto"},
    # prod: prompts can be personal data; a render pod without its GPU must fail, not crawl;
    # only authenticated callers may spend it.
    "prod": {"log_prompts": False, "device": "cuda", "auth_required": True},
}

CommaList = Annotated[list[str], NoDecode]


def _port_problem(exc: ValueError) -> str:
    """What ``urlsplit`` found wrong with a URL's host or port, never the text that stood
    there: in ``http://user:password@host`` without the ``@``, urllib takes the password for
    the port and quotes it."""
    if "IPv6" in str(exc):  # "Invalid IPv6 URL": a "[" without its "]", or the reverse
        return "its IPv6 host is not enclosed in [ and ]"
    return "its port is out of range" if "range" in str(exc) else "its port is not a number"


def _spacing_problem(value: str) -> str | None:
    """Whitespace around ``value``, or a control character in it, said in words; None if none.

    ``urlsplit`` drops both without a word (leading C0 controls and spaces, and every tab and
    newline, as the WHATWG URL Standard's basic URL parser does), and keeps trailing spaces in
    the host: the URL it reads is not the text given, which is what is kept or sent (a
    ``kubectl create secret --from-file`` value ends in a newline).
    """
    if value.strip(_JS_WHITESPACE) != value:
        return "begins or ends with whitespace (a newline from a file, a stray space)"
    if any(unicodedata.category(c) == "Cc" for c in value):
        return "has a control character in it (a tab, a newline)"
    return None


def _http_url(value: str | None) -> str | None:
    """``value`` when it is an absolute http(s) URL that ``urlsplit`` (which botocore and httpx
    build on) reads whole, port included, with nothing it drops (:func:`_spacing_problem`);
    never echoes it (a URL may carry credentials)."""
    if not value:
        return value
    problem = _spacing_problem(value)
    if problem:
        raise ValueError(problem)
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({_port_problem(exc)})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError("not an http:// or https:// URL with a host")
    return value


def _required_http_url(value: str) -> str:
    """An :func:`_http_url` for a setting that has a default and no "off": empty is refused."""
    if not value:
        raise ValueError("empty: give an http:// or https:// URL, or leave it unset")
    return _http_url(value) or value


def _s3_endpoint_url(value: str | None) -> str | None:
    """An :func:`_http_url` with no query and no fragment, not even an empty one (a ``?`` or
    ``#``): botocore's endpoint rules refuse a URL with a query (``parse_url`` in
    botocore/endpoint_provider.py, "URLs with queries are not supported"), every request then
    a retryable ``EndpointResolutionError``, and drop a fragment without a word."""
    value = _http_url(value)
    if value and ("?" in value or "#" in value):  # after the host either one ends it
        raise ValueError(
            "has a ? or #: botocore refuses an endpoint's query and drops its fragment; give"
            " scheme://host[:port][/path]"
        )
    return value


def _s3_region(value: str | None) -> str | None:
    """``value`` when botocore takes it as a region name, a host label of up to 63 letters,
    digits and hyphens, no hyphen first or last and not all digits (``validate_region_name``
    in botocore/utils.py, which every client's creation runs); never echoes it. Empty is
    botocore's too, and is the preset's region (:func:`imagegen.storage.presets.s3_options`).
    Checked here, not by importing botocore, which would cost every function's start; a
    newline after it, which the ``$`` of botocore's pattern lets through, is refused
    (:func:`_spacing_problem`): it would be sent in every request's signature."""
    import re

    if value is None:
        return value
    problem = _spacing_problem(value)
    if problem:
        raise ValueError(problem)
    if re.fullmatch(r"(?![0-9]+$)(?!-)[a-zA-Z0-9-]{,63}(?<!-)", value):
        return value
    raise ValueError(
        "not a region name botocore takes: up to 63 letters, digits and hyphens, such as"
        " eu-west-1 or auto"
    )


# libpq's connection parameter key words (PostgreSQL's docs, "Parameter Key Words";
# PQconninfoOptions in src/interfaces/libpq/fe-connect.c, libpq 18), with those of older
# releases still written in connection strings (requiressl, tty, authtype) and servicefile,
# newer than libpq 18: a ledger URL that begins "<one of these>=" is a key=value connection
# string.
_LIBPQ_KEYWORDS = frozenset(
    "application_name authtype channel_binding client_encoding connect_timeout dbname "  # noqa: SIM905
    "fallback_application_name gssdelegation gssencmode gsslib host hostaddr keepalives "
    "keepalives_count keepalives_idle keepalives_interval krbsrvname load_balance_hosts "
    "max_protocol_version min_protocol_version oauth_client_id oauth_client_secret "
    "oauth_issuer oauth_scope options passfile password port replication require_auth "
    "requirepeer requiressl scram_client_key scram_server_key service servicefile "
    "ssl_max_protocol_version ssl_min_protocol_version sslcert sslcertmode sslcompression "
    "sslcrl sslcrldir sslkey sslkeylogfile sslmode sslnegotiation sslpassword sslrootcert "
    "sslsni target_session_attrs tcp_user_timeout tty user".split()
)


def _libpq_keyword(value: str) -> str | None:
    """The libpq key word ``value`` begins with, followed by ``=`` (``host=db port=5432``,
    spaces around the ``=`` as libpq's ``conninfo_parse`` allows them), in lower case; None
    where it begins otherwise. A SQLite path that begins so is written ``./host=…``."""
    import re

    found = re.match(r"([A-Za-z_]+)\s*=", value)
    word = found[1].lower() if found else None
    return word if word in _LIBPQ_KEYWORDS else None


def _ledger_url(value: SecretStr | None) -> SecretStr | None:
    """``value`` when it names a ledger: a database URL or path, as the ledger's store reads
    them (:func:`imagegen.ledger.store.backend`), or the ledger function's :func:`_http_url`
    (which the command line reads); never echoes it (a URL may hold a password).

    A libpq key=value connection string (``host=db password=…``, :func:`_libpq_keyword`) is
    refused: the store reads no such string, and would take it for a SQLite file's name, the
    command line reading an empty history from it and the ledger function writing one."""
    if value is None:
        return value
    url = value.get_secret_value()
    problem = _spacing_problem(url)
    if problem:  # a database named "imagegen\n" is one that does not exist
        raise ValueError(problem)
    if url.lower().startswith(("http://", "https://")):
        _http_url(url)
        return value
    keyword = _libpq_keyword(url)
    if keyword:
        raise ValueError(
            f"a libpq key=value connection string, beginning {keyword}=, which the ledger does"
            " not read: give a postgresql://user:password@host:port/dbname URL, or"
            f" ./{keyword}=… for a SQLite file so named"
        )
    from imagegen.errors import InvalidRequest
    from imagegen.ledger.store import backend

    try:
        kind = backend(url)
    except InvalidRequest as exc:
        raise ValueError(f"{exc.message}, or the ledger function's http(s):// URL") from None
    problem = _postgres_url_problem(url) if kind == "postgres" else None
    if problem:
        raise ValueError(f"not a valid PostgreSQL URL ({problem})")
    if kind == "sqlite":
        from imagegen.errors import ConfigurationError
        from imagegen.ledger.store import ledger_path

        try:
            ledger_path(url)  # expands a "~" it starts with, as the ledger opens it
        except ConfigurationError as exc:  # never echoes the path
            raise ValueError(exc.errors[0]["message"]) from None
    return value


def _postgres_url_problem(url: str) -> str | None:
    """What libpq would refuse in the ports of ``url`` before connecting, never the text that
    stood there; None when they are fine.

    libpq's URI (PostgreSQL's docs, "Connection URIs"): ``postgresql://[user@]host[:port]
    [,host[:port]...][/dbname][?port=...]``, each port a number from 1 to 65535 (libpq's
    ``fe-connect.c``: "invalid port number"), or empty for the default. psycopg's parser
    (``conninfo_to_dict``) passes any port on, and the ledger would say it is ready and fail
    every query; it is not used here either way: importing psycopg would cost every function's
    start.
    """
    from urllib.parse import unquote  # libpq decodes %xx in every part

    from imagegen._pgurl import split_postgres_url

    parts = split_postgres_url(url)
    if parts.problem:
        return "its IPv6 host is not enclosed in [ and ]"
    ports = [port for _, port in parts.hosts if port is not None]
    for pair in (parts.query or "").split("&"):
        name, _, given = pair.partition("=")
        if unquote(name) == "port":
            ports.extend(given.split(","))
    for port in filter(None, map(unquote, ports)):
        if not port.isascii() or not port.isdigit():
            return "its port is not a number"
        if not 1 <= int(port) <= 65535:
            return "its port is out of range"
    return None


# Unicode's Default_Ignorable_Code_Point in the BMP (DerivedCoreProperties.txt): UTS #46
# disallows them in a label, IDNA 2003 takes a few (the Hangul fillers).
_DEFAULT_IGNORABLE = (
    "[\xad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8]"
)


def _served_origin(scheme: str, netloc: str) -> str:
    """``netloc`` (a host and an optional port, no user name) as browsers write it, by the
    WHATWG URL Standard's host and port parsing (browsers', the Worker's ``new URL``): the
    host in lower case, an IPv4 address as four decimal numbers (``127.1`` is ``127.0.0.1``),
    an IPv6 address compressed (``[2001:DB8:0::1]`` is ``[2001:db8::1]``), a port without
    leading zeros and none where it is the scheme's default. Each public URL is the base and a
    key, so records hold what browsers request.

    Raises:
        ValueError: saying what in it browsers refuse (a percent sign or a code point the
            standard forbids in a host, an IPv6 zone, a name ending in a number that is no
            IPv4 address) or what no server is reached at: a host that is no DNS name (labels
            of 1 to 63 letters, digits, hyphens and underscores, 253 characters in all, and
            one trailing dot at most: ``img..example.com`` or ``a"b.com`` are looked up
            nowhere), port 0, or a Unicode host, which browsers convert by UTS #46 and this
            check does not: its IDNA form (``xn--...``) is taken, where it decodes by IDNA
            2003 to left-to-right text of Unicode 3.2, which browsers take alike.
    """
    import re

    if netloc.startswith("["):  # _http_url saw its "]"
        host, _, rest = netloc[1:].partition("]")
    else:
        host, colon, port = netloc.partition(":")
        rest = colon + port
    port = rest.removeprefix(":")
    if rest and (rest == port or (port and not (port.isascii() and port.isdigit()))):
        raise ValueError("has a port that is not a number from 1 to 65535")
    number = int(port) if port else None
    if number == 0:
        raise ValueError("has port 0, at which no server is reached")
    after = "" if number in (None, {"http": 80, "https": 443}[scheme]) else f":{number}"
    if netloc.startswith("["):
        return f"[{_ipv6(host)}]{after}"
    if not host.isascii():
        raise ValueError(
            "has a host that is not ASCII: give its IDNA form (xn--...), as browsers write it"
        )
    if "%" in host:
        raise ValueError("has a percent sign in its host, which browsers decode: give it decoded")
    host = host.lower()
    if not re.fullmatch(r"[a-z0-9_.-]+", host):
        raise ValueError(_NO_DNS_NAME)
    labels = host.removesuffix(".").split(".")
    if re.fullmatch(r"[0-9]+", labels[-1]) or _ipv4_number(labels[-1]) is not None:
        return _ipv4(labels) + after  # the standard's "ends in a number"
    if len(host.removesuffix(".")) > 253 or not all(0 < len(name) < 64 for name in labels):
        raise ValueError(_NO_DNS_NAME)
    for idna in (name for name in labels if name.startswith("xn--")):
        try:
            decoded = idna.encode("ascii").decode("idna")
        except UnicodeError:
            decoded = ""
        # The codec's tables are Unicode 3.2's (IDNA 2003): it decodes code points 3.2 did not
        # have unchecked, and knows no right-to-left rule of UTS #46 (RFC 5893, whose rules
        # reach every label of a host with one right-to-left label). Those are refused.
        kinds = [unicodedata.ucd_3_2_0.category(c) for c in decoded]
        if (
            not kinds
            or unicodedata.category(decoded[0]).startswith("M")
            or {"Cn", "Co", "Cs"} & set(kinds)
            or {"R", "AL", "AN"} & set(map(unicodedata.bidirectional, decoded))
            or re.search(_DEFAULT_IGNORABLE, decoded)
        ):
            raise ValueError(
                "has an xn-- label in its host that is not valid IDNA, or right-to-left"
            )
    return host + after


_NO_DNS_NAME = (
    "has a host that is no DNS name (labels of letters, digits, hyphens and underscores,"
    " separated by single dots)"
)


def _ipv4_number(text: str) -> int | None:
    """``text`` read as the WHATWG URL Standard reads one part of an IPv4 address: decimal,
    hexadecimal after ``0x``, octal after ``0``; None where it is no number."""
    digits, base = text, 10
    if text[:2] == "0x":
        digits, base = text[2:], 16
    elif len(text) > 1 and text[0] == "0":
        digits, base = text[1:], 8
    if not text or not all(c in "0123456789abcdef"[:base] for c in digits):
        return None
    return int(digits, base) if digits else 0


def _ipv4(parts: list[str]) -> str:
    """The IPv4 address browsers read a host of these dot-separated ``parts`` as, dotted
    (the WHATWG URL Standard's IPv4 parser: the last part fills the bytes the others leave)."""
    numbers = [_ipv4_number(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise ValueError("has a host that ends in a number but is no IPv4 address")
    *first, last = [n for n in numbers if n is not None]
    if any(n > 255 for n in first) or last >= 256 ** (4 - len(first)):
        raise ValueError("has a host that ends in a number but is no IPv4 address")
    address = sum(n << (8 * (3 - i)) for i, n in enumerate(first)) + last
    return ".".join(str(address >> shift & 255) for shift in (24, 16, 8, 0))


def _ipv6(text: str) -> str:
    """The IPv6 address ``text`` as the WHATWG URL Standard writes it: hexadecimal in lower
    case without leading zeros, the first longest run of two or more zero pieces as ``::``,
    and no dotted IPv4 part (``::ffff:1.2.3.4`` is ``::ffff:102:304``)."""
    import ipaddress

    if "%" in text:
        raise ValueError("has an IPv6 address with a zone (%), which browsers refuse")
    try:
        packed = ipaddress.IPv6Address(text).packed
    except ValueError:
        raise ValueError("has an IPv6 host that is not an IPv6 address") from None
    pieces = [int.from_bytes(packed[at : at + 2]) for at in range(0, 16, 2)]
    runs = [
        (length, -start)
        for start in range(8)
        for length in range(2, 9 - start)
        if not any(pieces[start : start + length])
    ]
    written = [f"{piece:x}" for piece in pieces]
    if runs:
        length, start = max(runs)
        written[-start : -start + length] = [""]
        if -start == 0:
            written.insert(0, "")
        if -start + length == 8:
            written.append("")
    return ":".join(written)


def _served_base_url(value: str | None) -> str | None:
    """``value`` as browsers write it (:func:`_served_origin`) when it is an :func:`_http_url`
    with no user name or password, nothing after its host but ``/``, and no backslash.

    The Worker takes an object's key from the whole path of a request (``worker/src/keys.ts``)
    and a public URL is ``<base>/<key>``: a path in the base puts the key under it, a query or
    a fragment swallows it, and every URL persist writes is broken for good (records are
    written once). Credentials in it would be in every URL written into records and events,
    for anyone given one to read. Other URLs keep their paths: a broker's ingress or an
    endpoint may need one.
    """
    value = _http_url(value)
    if not value:
        return value
    if any(c.isspace() for c in value):  # inside it: around it, _http_url said so
        raise ValueError("has whitespace in it, which no origin has: give https://host[:port]")
    if "\\" in value:  # the WHATWG URL Standard reads it as "/" in an http(s) URL
        raise ValueError(
            "has a backslash in it, which browsers read as /: give https://host[:port]"
        )
    # The separators, not the parts: "https://host?" has an empty query, and breaks all the same;
    # "https://@host" has an empty user name.
    parts = urlsplit(value)
    before_fragment, hash_mark, _ = value.partition("#")
    found = [
        what
        for what, present in (
            ("a path", parts.path not in ("", "/")),
            ("a query", "?" in before_fragment),
            ("a fragment", bool(hash_mark)),
        )
        if present
    ]
    problems = []
    if "@" in parts.netloc:
        problems.append("has a user name or password, which every public URL would carry")
    if found:
        listed = f"{', '.join(found[:-1])} and {found[-1]}" if len(found) > 1 else found[0]
        problems.append(f"has {listed}: the Worker serves keys at the root of its host")
    if problems:
        raise ValueError(f"{'; '.join(problems)}, so give its origin alone (https://host[:port])")
    # Each URL is this text and a key, kept for good: it must be the URL urllib reads.
    if urlunsplit(parts) != value:
        raise ValueError(
            "is not the URL it reads as (urlsplit, then urlunsplit, write it otherwise: an"
            " upper-case scheme?), so give it as https://host[:port]"
        )
    try:
        origin = _served_origin(parts.scheme, parts.netloc)
    except ValueError as exc:
        raise ValueError(f"{exc}, so give it as https://host[:port]") from None
    return f"{parts.scheme}://{origin}{parts.path}"


# Standard Webhooks (standard-webhooks/standard-webhooks, spec/standard-webhooks.md, "Signature
# scheme"): a secret is ``whsec_`` + base64 of a random key of 24 to 64 bytes.
_WEBHOOK_KEY_BYTES = (24, 64)
DAY_S = 86_400.0
MAX_SIGNED_URL_TTL = 10 * 365 * 86_400
"""Ten years: far below where a URL's ``expires`` outgrows the 15 digits the Worker reads."""
Seconds = Annotated[float, Field(gt=0, le=DAY_S, allow_inf_nan=False)]
"""A wait: finite and at most :data:`DAY_S`, far past any render or reply and within what
every clock waits (``threading.TIMEOUT_MAX``; an infinite or huge timeout overflows it)."""


def webhook_key(secret: str) -> bytes:
    """The signing key of a Standard Webhooks secret (``whsec_`` + base64 of 24 to 64 bytes).

    Raises:
        ValueError: saying what is wrong with ``secret``, never what it is.
    """
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret must start with 'whsec_'")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret must be 'whsec_' followed by base64") from None
    low, high = _WEBHOOK_KEY_BYTES
    if not low <= len(key) <= high:
        raise ValueError(f"a webhook secret's key must be {low} to {high} bytes, not {len(key)}")
    return key


# An HMAC is no stronger than its key (NIST SP 800-107 Rev. 1): 16 random bytes give 128 bits.
# RFC 2104, section 3, discourages keys shorter than the hash's output (32 bytes for SHA-256),
# which the documented `openssl rand -hex 32` gives. The Worker holds SIGNING_SECRET to the
# same rule (worker/src/config.ts).
MIN_SIGNING_SECRET_BYTES = 16

# What JavaScript's String.prototype.trim() removes (ECMA-262 WhiteSpace and LineTerminator):
# `wrangler secret put` drops it from the end of the Worker's copy (trimEnd, in wrangler's
# src/utils/std.ts). Python's str.strip() differs (it keeps U+FEFF), so the set is spelled out.
_JS_WHITESPACE = (
    "\t\n\v\f\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)


def _signing_secret(value: SecretStr | None) -> SecretStr | None:
    """``value`` when it is long enough to sign URLs with; never echoes it.

    Empty is refused, not taken for unset: ``$(openssl rand -hex 32)`` that failed leaves the
    variable empty, and every URL persist writes, in records written once, would be unsigned.
    Whitespace around it is refused: read from a file ending in a newline (``kubectl create
    secret --from-file`` keeps it), it signs differently from the Worker's trimmed copy.
    """
    if value is None:
        return value
    secret = value.get_secret_value()
    size = len(secret.encode())
    if not size:
        raise ValueError("empty: give a random secret (openssl rand -hex 32), or leave it unset")
    if secret.strip(_JS_WHITESPACE) != secret:
        raise ValueError(
            "begins or ends with whitespace: the Worker's copy, set with wrangler secret put,"
            " loses trailing whitespace and would sign differently"
        )
    if size < MIN_SIGNING_SECRET_BYTES:
        raise ValueError(f"shorter than {MIN_SIGNING_SECRET_BYTES} bytes: use openssl rand -hex 32")
    return value


def _not_emptied(value: Any) -> Any:
    """``value``, unless it is text that names no entry: an empty ``IMAGEGEN_WEBHOOK_SECRETS``
    (a command that failed to make one) would turn webhooks off without a word, not on."""
    if isinstance(value, str) and not _split_list(value):
        raise ValueError("empty: give one or more whsec_ secrets, or leave it unset")
    return value


def _webhook_allowed(value: list[str]) -> list[str]:
    """``value`` when each entry is a network or an address, as the webhook sender reads them
    (``ipaddress.ip_network``, :class:`imagegen.ledger.webhooks.AddressPolicy`), or a host
    name; never echoes one. Anything else would be read as a host name no URL has, and allow
    nothing without a word (``10.0.0.0/33``: no network)."""
    import ipaddress

    for number, entry in enumerate(value, start=1):
        try:
            ipaddress.ip_network(entry, strict=False)
            continue
        except ValueError:
            pass
        host = entry.rstrip(".")
        try:
            host.encode("idna")  # what the sender refuses of a URL's host (an empty label ...)
        except UnicodeError:
            host = ""
        if not host or len(host) > 253 or any(c in "/:@" or c.isspace() for c in entry):
            raise ValueError(
                f"entry {number} of {len(value)} is neither a network (10.0.0.0/8), an address"
                " nor a host name"
            )
    return value


def _subjects_given(value: Any) -> Any:
    """``value``'s subjects: a JSON list, or text of one a line (as the ``kubectl`` command of
    docs/authentication.md prints them, a line break after each) or comma-separated.

    Text that names none is refused: an empty list admits any subject, and a command that
    printed nothing would open the function to every token for its audience without a word.
    """
    if not isinstance(value, str):
        return value
    import re

    text = value.strip()
    subjects = (
        json.loads(text)
        if text.startswith("[")
        else [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
    )
    if not subjects:
        raise ValueError(
            "empty: give the subjects to admit (system:serviceaccount:<namespace>:<name>),"
            " or leave it unset to admit any"
        )
    return subjects


def _service_account_subject(subject: str) -> bool:
    """Whether ``subject`` is the ``sub`` of a token the API server issues for a service
    account: ``system:serviceaccount:<namespace>:<name>`` (``MakeUsername``, k8s.io/apiserver
    ``pkg/authentication/serviceaccount/util.go``), the namespace a DNS-1123 label and the
    name a DNS-1123 subdomain, as Kubernetes validates them (``IsDNS1123Label``,
    ``IsDNS1123Subdomain``, k8s.io/apimachinery ``pkg/util/validation``)."""
    import re

    label = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
    found = re.fullmatch(rf"system:serviceaccount:({label}):({label}(?:\.{label})*)", subject)
    return found is not None and len(found[1]) <= 63 and len(found[2]) <= 253


def _service_account_subjects(value: list[str]) -> list[str]:
    """``value`` when no entry has whitespace in it, and each that names a service account
    (``system:serviceaccount:``) names one whole; never echoes one. Such an entry matches no
    token: the function would refuse the broker it names 403, every delivery dead-lettered
    (Knative does not retry a 403), and say so only then. Subjects of another form are taken
    as given: an issuer other than the API server (``IMAGEGEN_OIDC_DISCOVERY_URL``) names its
    callers its own way."""
    for number, subject in enumerate(value, start=1):
        if any(c.isspace() for c in subject):
            problem = "has whitespace in it: separate subjects with commas or newlines"
        elif subject.startswith("system:serviceaccount:") and not _service_account_subject(subject):
            problem = (
                "is not a service account's subject (system:serviceaccount:<namespace>:<name>)"
            )
        else:
            continue
        raise ValueError(f"entry {number} of {len(value)} {problem}")
    return value


def _keep_alive_duration(value: str | None) -> str | None:
    """``value`` when Ollama reads it as a duration (its ``api.Duration``: a number of
    seconds, negative for always, or a Go duration such as ``1h30m``)."""
    import re

    unit = r"(\d+\.?\d*|\.\d+)"
    if value is None or re.fullmatch(rf"[-+]?({unit}|({unit}(ns|us|µs|μs|ms|s|m|h))+)", value):
        return value
    raise ValueError("not a duration: give one such as 30m or 24h, seconds, or -1 for always")


_EMPTY_IS_UNSET = frozenset({"IMAGEGEN_OLLAMA_HOST", "OLLAMA_HOST"})
"""Variables that count as unset when empty, as Ollama reads an empty ``OLLAMA_HOST``
(ollama-python's ``_parse_host``: the default host; pydantic-settings' ``env_ignore_empty``, for
these alone): the next of them, or the default, is read instead. Else an empty
``IMAGEGEN_OLLAMA_HOST`` would hide ``OLLAMA_HOST`` from the settings, and the Ollama client,
given an empty host, would read that itself, unchecked (``host or os.getenv('OLLAMA_HOST')``)."""


def _drop_empty(source: PydanticBaseSettingsSource) -> None:
    """Forget the variables of :data:`_EMPTY_IS_UNSET` that ``source`` found empty."""
    if isinstance(source, EnvSettingsSource):  # the environment, and the .env file
        source.env_vars = {
            name: value
            for name, value in source.env_vars.items()
            if value or name.upper() not in _EMPTY_IS_UNSET
        }


def _ollama_host(value: str) -> str:
    """``value`` when the Ollama client can read it: ``[http(s)://]host[:port][/path]``, the
    forms of ``OLLAMA_HOST`` that ``_parse_host`` (ollama-python, ``ollama/_client.py``) takes.

    Never empty: the client would take an empty host for none, and read ``OLLAMA_HOST``. User-info
    is taken (the enhancer sends it as Basic auth); a query or fragment is not: the client drops
    it, and would send no token it holds."""
    if not value:
        raise ValueError("empty: give a host, or leave it unset for the default")
    problem = _spacing_problem(value)
    if problem:  # the client would connect to another host than the one logged and said
        raise ValueError(problem)
    scheme, separator, rest = value.partition("://")
    if not separator:
        scheme, rest = "http", value
    if scheme not in ("http", "https"):
        raise ValueError("not an http(s):// URL or host[:port]")
    if "@" in rest and any(c in rest[: rest.rfind("@")] for c in "/?#[]"):
        # urlsplit ends the authority at the first of /?#: the host would be read from the
        # user-info, and the password taken for a port, a path, a query or a fragment; and it
        # reads a [ or ] in the authority as an IPv6 host's.
        raise ValueError(
            "has a /, ?, #, [ or ] before an @: in user-info (http://user:password@host) they"
            " must be percent-encoded (%2F, %3F, %23, %5B, %5D), as must an @ in a path (%40)"
        )
    try:
        url = urlsplit(f"{scheme}://{rest}")
        url.port  # noqa: B018 - raises like _parse_host would
    except ValueError as exc:
        raise ValueError(f"not a valid URL or host[:port] ({_port_problem(exc)})") from None
    if url.query or url.fragment or rest.endswith(("?", "#")):
        # _parse_host builds the base URL from the host and path alone: a token in the query
        # would never be sent, and every prompt would be refused by the proxy that wants it.
        raise ValueError(
            "has a query or fragment (?token=…), which the Ollama client never sends: give a"
            " proxy's credentials as user-info (http://user:password@host), sent as Basic auth"
        )
    return value


def _time_zone(value: str) -> str:
    """``value`` when a request could name it as its ``timezone`` (the same rule)."""
    from imagegen.models import _valid_timezone

    try:
        _valid_timezone(value)
    except ValueError:
        raise ValueError("unknown IANA time zone") from None  # the value is never echoed
    return value


# The settings a job carries in its events, bounded as the job's fields are (imagegen.models):
# one longer is refused here, at start-up, not in every request that uses it.
_LOCAL_MODEL_HINT = "(a local directory: name it by a shorter path, a symbolic link to it)"
# Enhance signs a prompt Ollama wrote "ollama:<model>" (OllamaEnhancer.name,
# imagegen/enhance/llm.py), and a job's enhancer is at most MAX_ENHANCER_CHARS.
MAX_OLLAMA_MODEL_CHARS = MAX_ENHANCER_CHARS - len("ollama:")
# A LoRA found in lora_dir is named by its path: the directory's, "/" and the entry's name, which
# is at most 255 bytes, and so characters, on Linux's file systems (NAME_MAX, linux/limits.h).
MAX_LORA_DIR_CHARS = MAX_LORA_PATH_CHARS - 1 - 255


def _model_name(value: str) -> str:
    """``value`` when a job can name it as its model (at most ``MAX_MODEL_CHARS``) and a ``~``
    it starts with names a home (:func:`_path_chars`): render expands it at every job."""
    if len(value) > MAX_MODEL_CHARS:
        raise ValueError(
            f"longer than {MAX_MODEL_CHARS} characters, the most a job's model may have "
            + _LOCAL_MODEL_HINT
        )
    _path_chars(value)
    return value


def _model_names(value: list[str]) -> list[str]:
    """``value`` when a job can name each entry as its model, and a ``~`` one starts with
    names a home; never echoes one."""
    for number, model in enumerate(value, start=1):
        if len(model) > MAX_MODEL_CHARS:
            raise ValueError(
                f"entry {number} of {len(value)} is longer than {MAX_MODEL_CHARS} characters,"
                f" the most a job's model may have {_LOCAL_MODEL_HINT}"
            )
        try:
            _path_chars(model)
        except ValueError as exc:
            raise ValueError(f"entry {number} of {len(value)}: {exc}") from None
    return value


def _ollama_name_part(kind: str, part: str) -> bool:
    """Whether ``part`` is a valid ``kind`` part of an Ollama model name (types/model/name.go,
    ``isValidPart``): a letter, digit or ``_`` first, then those, ``-``, ``.`` (not in a
    namespace) and ``:`` (in a host only); 1 to 80 characters, a host up to 350."""
    allowed = "_-" + ("" if kind == "namespace" else ".") + (":" if kind == "host" else "")
    return (
        1 <= len(part) <= (350 if kind == "host" else 80)
        and part[0].isascii()
        and (part[0].isalnum() or part[0] == "_")
        and all(c.isascii() and (c.isalnum() or c in allowed) for c in part[1:])
    )


def _ollama_name_cut(value: str, sep: str) -> tuple[str, str, bool]:
    """``value`` cut at its last ``sep``, as types/model/name.go's ``cutPromised``: a side
    left empty is a missing part (``!MISSING!``, which no part may be)."""
    before, found, after = value.rpartition(sep)
    if not found:
        return value, "", False
    return before or "!MISSING!", after or "!MISSING!", True


def _ollama_source_suffix(value: str) -> tuple[str, bool]:
    """``value`` without the suffix that says where the model runs, and whether it had one
    (internal/modelref/modelref.go, ``parseSourceSuffix``): a last ``:`` part that is
    ``cloud`` or ``local`` is dropped; one ending in ``-cloud`` (and with no ``/``) loses that."""
    rest, colon, suffix = value.rpartition(":")
    if not colon:
        return value, False
    suffix = suffix.strip()
    if suffix.lower() in ("cloud", "local"):
        return rest, True
    if "/" not in suffix and suffix.lower().endswith("-cloud"):
        return f"{rest}:{suffix[: -len('-cloud')]}", True
    return value, False


def _ollama_name_valid(value: str) -> bool:
    """Whether Ollama takes ``value`` as a model's name, ``[host/][namespace/]model[:tag]``.

    types/model/name.go (ollama v0.12.6 to v0.33): ``ParseNameBare`` cuts the tag at a ``:``
    after the last ``/``, then the model and the namespace at the last ``/`` each, and keeps
    the rest as the host (what comes before a ``://`` dropped); ``ParseName`` fills the parts
    left out (``registry.ollama.ai/library/?:latest``), and ``IsValid`` wants each part valid.
    ChatHandler (server/routes.go) answers any other name with a 400, ``model is required``
    (``invalid model name`` from v0.18.0, which also reads a ``:cloud`` or ``:local`` suffix,
    or a tag ending in ``-cloud``, as where the model runs, and refuses a name with a second
    such suffix under the first: internal/modelref/modelref.go, ``ParseRef``).
    """
    value, explicit = _ollama_source_suffix(value)
    if explicit and _ollama_source_suffix(value)[1]:  # x:local:cloud, x:cloud-cloud
        return False
    tag = host = namespace = ""
    if value.rfind(":") > value.rfind("/"):
        value, tag, _ = _ollama_name_cut(value, ":")
    value, model, cut = _ollama_name_cut(value, "/")
    if not cut:
        model = value
    else:
        value, namespace, cut = _ollama_name_cut(value, "/")
        if not cut:
            namespace = value
        else:
            scheme, found, after = value.partition("://")
            host = after if found else scheme
    return (
        _ollama_name_part("host", host or "registry.ollama.ai")
        and _ollama_name_part("namespace", namespace or "library")
        and _ollama_name_part("model", model)
        and _ollama_name_part("tag", tag or "latest")
    )


def _ollama_model(value: str) -> str:
    """``value`` when Ollama takes it as a model's name, and the enhancer name it makes,
    ``ollama:<model>``, fits a job."""
    if not value:
        raise ValueError("empty: give the model's name, such as llama3.2")
    if not _ollama_name_valid(value):
        raise ValueError(
            "not a model name Ollama takes: [host/][namespace/]model[:tag], each part letters,"
            " digits, _ - . (llama3.2, llama3.2:latest, hf.co/user/repo:Q4_K_M)"
        )
    if len(value) > MAX_OLLAMA_MODEL_CHARS:
        raise ValueError(
            f"longer than {MAX_OLLAMA_MODEL_CHARS} characters: a prompt it writes is signed"
            f" ollama:<model>, at most {MAX_ENHANCER_CHARS} characters"
        )
    return value


def _path_chars(path: str | Path) -> int:
    """The characters of ``path`` as given or with ``~`` expanded, the more of the two.

    Raises:
        ValueError: ``~`` names no home this process can find (an unknown ``~user``, a user
            with no passwd entry and no ``HOME``, as in many containers): the lora plugin and
            render expand it at every draw and every job, and would fail each one.
    """
    return max(len(str(path)), len(str(expanded(path))))


def _storage_path(value: str) -> str:
    """``value`` when a ``~`` it starts with, as a local path (no ``scheme://``), names a
    home (:func:`_path_chars`): local storage expands it as it opens."""
    if "://" not in value:
        _path_chars(value.strip())
    return value


def _lora_paths(value: list[str]) -> list[str]:
    """``value`` when each entry, as the lora plugin gives it (a hub id as written, a local
    path with ``~`` expanded), fits a LoRA's path in a job; never echoes one. One longer made
    the plugin fail at every draw, each LoRA with it."""
    for number, entry in enumerate(value, start=1):
        try:
            chars = _path_chars(entry)
        except ValueError as exc:
            raise ValueError(f"entry {number} of {len(value)}: {exc}") from None
        if chars > MAX_LORA_PATH_CHARS:
            raise ValueError(
                f"entry {number} of {len(value)} is longer than {MAX_LORA_PATH_CHARS}"
                " characters (~ expanded), the most a LoRA's path may have"
            )
    return value


def _lora_dir(value: Path | None) -> Path | None:
    """``value`` when every LoRA the directory can hold has a path that fits a job."""
    if value is not None and _path_chars(value) > MAX_LORA_DIR_CHARS:
        raise ValueError(
            f"longer than {MAX_LORA_DIR_CHARS} characters (~ expanded): with the name of a LoRA"
            f" in it (up to 255), its path may be longer than {MAX_LORA_PATH_CHARS}, the most a"
            " LoRA's path may have"
        )
    return value


def _plugin_count(value: list[str]) -> list[str]:
    """``value`` when a request could name as many plugins (at most ``MAX_PLUGINS``): a job
    holds one contribution of each, and no more than that many; each named as a contribution
    may be (at most ``MAX_PLUGIN_NAME_CHARS``). Never echoes a name."""
    if len(value) > MAX_PLUGINS:
        raise ValueError(
            f"{len(value)} plugins, more than the {MAX_PLUGINS} a request runs (a job holds"
            f" {MAX_PLUGINS} contributions at most)"
        )
    for number, name in enumerate(value, start=1):
        if len(name) > MAX_PLUGIN_NAME_CHARS:
            raise ValueError(
                f"entry {number} of {len(value)} is longer than {MAX_PLUGIN_NAME_CHARS}"
                " characters, the most a contribution's plugin name may have"
            )
    return value


def _key_hashes(value: list[str]) -> list[str]:
    """``value`` when each entry is an API key's hash, as the functions' gate reads them
    (:class:`imagegen.auth.api_keys.ApiKeys`); never echoes one. Any other entry would fail
    every function's start-up, each request then answered 503 (retried without end)."""
    if (problem := malformed_hashes(value)) is not None:
        raise ValueError(problem)
    return value


def _entries_by_place(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """``value`` as ``handler`` validates it, an entry of a list or tuple it refuses named by
    its place (``entry 2 of 3: Input should be a valid integer``), as the settings' own checks
    name one, not by pydantic's index from 0 (``IMAGEGEN_DERIVATIVE_WIDTHS.1``); pydantic's
    reason is kept, which quotes no value."""
    try:
        return handler(value)
    except ValidationError as exc:
        if not isinstance(value, list | tuple):
            raise
        errors = []
        for error in exc.errors(include_url=False):
            loc, reason = error["loc"], error["msg"]
            index = loc[0] if loc else None
            if isinstance(index, int):
                loc, reason = loc[1:], f"entry {index + 1} of {len(value)}: {reason}"
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], reason),
                    loc=loc,
                    input=error["input"],
                )
            )
        raise ValidationError.from_exception_data(exc.title, errors, hide_input=True) from None


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


_OTHER_VARIABLES = frozenset({"IMAGEGEN_API_KEY", "IMAGEGEN_FUNCTIONS_DIR"})
"""``IMAGEGEN_*`` variables read outside the settings: the CLI's API key (``--token``) and
where ``imagegen serve`` finds ``functions/``."""


class Settings(BaseSettings):
    """Every setting of imagegen; see the table in docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEGEN_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        # Errors never quote what was given: several settings are secrets.
        hide_input_in_errors=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources in its order, the ``.env`` one only where there is such a
        file: looking for one that is not there walks every setting all the same, a few ms of
        each function's start."""
        _refuse_unknown_keywords(settings_cls, init_settings)
        files = getattr(dotenv_settings, "env_file", None)
        named = [files] if isinstance(files, str | Path) else list(files or ())
        dotenv = [dotenv_settings] if any(Path(f).expanduser().is_file() for f in named) else []
        for source in (env_settings, *dotenv):
            _drop_empty(source)
        return (init_settings, env_settings, *dotenv, file_secret_settings)

    profile: Literal["dev", "prod"] = "dev"

    # Render
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Model used when a request names none; a render service loads it.",
    )
    served_models: CommaList = Field(
        default=[DEFAULT_MODEL, "black-forest-labs/FLUX.1-schnell", "tiny", "tiny-klein"],
        validation_alias=AliasChoices(
            "IMAGEGEN_SERVED_MODELS", "IMAGEGEN_ALLOWED_MODELS", "served_models"
        ),
        description="What the deployment's render services serve: the models a request may "
        "name (ids, local paths, 'tiny', 'tiny-klein').",
    )
    # NoDecode: the JSON is read by _json_options, so bad JSON is a validation error naming it.
    model_revisions: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Hub revision per model (JSON), over the pins of the model table.",
    )
    allow_non_commercial: bool = Field(
        default=False, description="Allow serving models whose licence forbids commercial use."
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field(default="auto")
    model_cache_dir: Path | None = Field(default=None, description="Hugging Face cache directory.")
    hf_token: SecretStr | None = Field(default=None, description="Token for gated models.")
    render_queue_size: int | None = Field(
        default=None,
        ge=0,
        description="Renders that may wait; 429 beyond. None: what finishes within render_timeout.",
    )
    render_batch_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Compatible renders run as one pipeline call; 1: unbatched, bit-exact.",
    )
    render_batch_window_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=10_000.0,
        allow_inf_nan=False,
        description="Milliseconds a render waits for compatible jobs to share its batch.",
    )
    render_warmup: bool = Field(
        default=False, description="Render an image and a full batch before ready (times renders)."
    )
    render_compile: Literal["off", "regional", "full"] = Field(
        default="off", description="CUDA: torch.compile the transformer (regional: its blocks)."
    )
    render_compile_cache_dir: Path | None = Field(
        default=None, description="CUDA: persistent torch.compile cache (a writable volume)."
    )
    render_fp8: bool = Field(
        default=False, description="CUDA 8.9+: fp8 weights and activations via torchao."
    )
    render_fuse_qkv: bool = Field(default=False, description="CUDA: fused QKV projections.")
    render_timeout: Seconds = Field(
        default=600.0,
        description="Seconds a render request may take, queueing included (at most a day).",
    )

    @model_validator(mode="after")
    def _render_window(self) -> Settings:
        # A window as long as the budget ends every lone request in a timeout, before its call.
        if self.render_batch_window_ms / 1000 >= self.render_timeout:
            raise ValueError(
                f"{self.variable('render_batch_window_ms')} must be shorter than "
                f"{self.variable('render_timeout')}"
            )
        return self

    # Enhance
    ollama_host: str = Field(
        default="http://127.0.0.1:11434",
        validation_alias=AliasChoices("IMAGEGEN_OLLAMA_HOST", "OLLAMA_HOST", "ollama_host"),
    )
    ollama_model: str = "llama3.2"
    ollama_temperature: float = Field(default=0.8, ge=0.0, le=2.0, allow_inf_nan=False)
    ollama_timeout: Seconds = 30.0
    ollama_retries: int = Field(default=2, ge=0, le=10)
    ollama_keep_alive: str | None = Field(
        default=None,
        # Ollama's api.Duration, checked by _keep_alive_duration (a pattern's error quotes it).
        description="How long Ollama keeps the model loaded after a prompt: a duration (30m,"
        " 24h), seconds, or -1 for always; unset: Ollama's own default (5 minutes).",
    )
    ollama_breaker_threshold: int = Field(
        default=3, ge=0, description="Failed prompts in a row that open the circuit; 0: never."
    )
    ollama_breaker_cooldown: Seconds = Field(
        default=30.0, description="Seconds the open circuit skips Ollama before a probe."
    )
    enhance_fallback: bool = Field(
        default=True, description="Ollama down: template prompt (true) or retryable 503 (false)."
    )
    plugins: CommaList = Field(
        default=["time_of_day", "holiday", "art_style", "lora", "remote_context"],
        description="Plugins run by default, in order.",
    )
    plugin_options: Annotated[dict[str, dict[str, Any]], NoDecode] = Field(default_factory=dict)
    timezone: str = Field(default="UTC", description="IANA zone for time-aware plugins.")
    holiday_countries: CommaList = Field(default=["US"])
    lora_dir: Path | None = Field(default=None, description="Directory of LoRA weights.")
    loras: CommaList = Field(default=[], description="LoRA names or paths, besides lora_dir.")
    lora_probability: float = Field(default=0.25, ge=0.0, le=1.0, allow_inf_nan=False)
    remote_context_url: str | None = None
    remote_context_timeout: Seconds = 2.0
    remote_context_max_bytes: int = Field(default=16_384, gt=0)

    # Storage
    storage_url: str = Field(default="./output", description="A directory or s3://bucket/prefix.")
    s3_preset: Literal["aws", "gcs", "r2", "minio"] | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: Literal["auto", "virtual", "path"] | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    public_base_url: str | None = Field(
        default=None, description="The Worker's origin, https://host[:port]: keys at its root."
    )
    url_signing_secret: SecretStr | None = Field(default=None, description="Signs public URLs.")
    signed_url_ttl: int = Field(
        default=7 * 24 * 3600,
        gt=0,
        le=MAX_SIGNED_URL_TTL,
        description="Signed URL lifetime (s), at most ten years.",
    )
    thumbnail_size: int = Field(default=256, ge=16, le=1024)
    png_compress_level: int = Field(
        default=6, ge=0, le=9, description="zlib level of PNGs: 0 fastest, 9 smallest."
    )
    png_compress_strategy: Literal["default", "rle"] = Field(
        default="default",
        description="zlib strategy of PNGs: rle encodes 2-8x faster, files within ~2% on photos.",
    )
    png_encode_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Threads encoding one PNG: 1 is Pillow's encoder; more compress rows in parts.",
    )
    derivative_widths: Annotated[list[Annotated[int, Field(ge=16, le=8192)]], NoDecode] = Field(
        default=[256, 512, 1024], description="Widths of AVIF/WebP derivatives (never upscaled)."
    )

    # Ledger
    ledger_url: SecretStr | None = Field(
        default=None,
        description=(
            "postgresql://… or a SQLite path; default: imagegen/ledger.db under $XDG_DATA_HOME"
            " (else ~/.local/share)."
        ),
    )
    ledger_retention_days: int = Field(default=90, ge=0, description="History kept (0: forever).")
    webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default=[], description="Standard Webhooks secrets (whsec_…); each signs every message."
    )
    webhook_allowed: CommaList = Field(
        default=[], description="Hosts and networks webhooks may reach; empty: public addresses."
    )
    # Standard Webhooks, "Request timeouts": "somewhere between 15 and 30s".
    webhook_timeout: Seconds = Field(default=15.0, description="Seconds per webhook attempt.")
    webhook_max_attempts: int = Field(default=15, ge=1, le=30)
    sink_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("IMAGEGEN_SINK_URL", "K_SINK", "sink_url"),
        description="Where the ledger sends replays: the broker (a SinkBinding sets K_SINK).",
    )
    sink_token_file: Path = Field(
        default=Path("/oidc/token"),
        description="OIDC token for the broker, sent with each replay when the file exists.",
    )
    # Authentication (see imagegen.auth)
    auth_required: bool = Field(
        default=False, description="Require a bearer token on invocations (dev: off, prod: on)."
    )
    auth_audience: str | None = Field(
        default=None, description="Audience an OIDC token must name; default imagegen-<function>."
    )
    auth_subjects: CommaList = Field(
        default=[],
        description="OIDC subjects admitted; unset: any, for the audience.",
    )
    api_key_hashes: CommaList = Field(
        default=[], description="sha256:<hex> of each API key accepted (rotate by overlapping)."
    )
    oidc_discovery_url: str = Field(
        default="https://kubernetes.default.svc",
        description="Where /.well-known/openid-configuration names the issuer and its JWKS.",
    )
    oidc_ca_file: Path | None = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
        description="CA bundle for the discovery URL, when the file exists.",
    )
    oidc_token_file: Path | None = Field(
        default=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        description="Token sent to the discovery URL, when the file exists.",
    )
    oidc_clock_skew: float = Field(
        default=60.0, ge=0, le=600, allow_inf_nan=False, description="Leeway in seconds."
    )
    oidc_jwks_ttl: Seconds = Field(default=300.0, description="Seconds signing keys are cached.")

    # Logs
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_prompts: bool = Field(
        default=True, description="Prompts in INFO logs (dev: on, prod: off)."
    )

    # Defined before every other check of a setting, so it runs within them: after the
    # "before" ones (a list split from its text, whose entries it counts) and around pydantic's
    # own, which name an entry by its index.
    _places = field_validator("*", mode="wrap")(_entries_by_place)
    _split = field_validator(
        "served_models",
        "plugins",
        "holiday_countries",
        "loras",
        "webhook_secrets",
        "webhook_allowed",
        "derivative_widths",
        "api_key_hashes",
        mode="before",
    )(_split_list)

    @field_validator("plugin_options", "model_revisions", mode="before")
    @classmethod
    def _json_options(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    _urls = field_validator("sink_url")(_http_url)
    _s3_endpoint = field_validator("s3_endpoint_url")(_s3_endpoint_url)
    _region = field_validator("s3_region")(_s3_region)
    _discovery = field_validator("oidc_discovery_url")(_required_http_url)
    _served_base = field_validator("public_base_url")(_served_base_url)
    _ledger = field_validator("ledger_url")(_ledger_url)
    _storage = field_validator("storage_url")(_storage_path)
    _ollama = field_validator("ollama_host")(_ollama_host)
    _zone = field_validator("timezone")(_time_zone)
    # What flows into a job's bounded fields (imagegen.models), refused at start-up.
    _model_bound = field_validator("model")(_model_name)
    _served_bound = field_validator("served_models")(_model_names)
    _ollama_bound = field_validator("ollama_model")(_ollama_model)
    _loras_bound = field_validator("loras")(_lora_paths)
    _lora_dir_bound = field_validator("lora_dir")(_lora_dir)
    _plugins_bound = field_validator("plugins")(_plugin_count)
    _keep_alive = field_validator("ollama_keep_alive")(_keep_alive_duration)
    _signing = field_validator("url_signing_secret")(_signing_secret)
    _allowed = field_validator("webhook_allowed")(_webhook_allowed)
    _api_keys = field_validator("api_key_hashes")(_key_hashes)
    # Runs before _split (pydantic runs "before" validators last defined first): only the
    # text given tells an empty variable from an unset one.
    _no_empty_secrets = field_validator("webhook_secrets", mode="before")(_not_emptied)
    # Split on its own: one a line too (as kubectl prints them), and none is refused, not any.
    _subjects_split = field_validator("auth_subjects", mode="before")(_subjects_given)
    _subjects = field_validator("auth_subjects")(_service_account_subjects)

    @field_validator("served_models")
    @classmethod
    def _some_served(cls, value: list[str]) -> list[str]:
        if not value:  # else said as "IMAGEGEN_MODEL must be one of IMAGEGEN_SERVED_MODELS ()"
            raise ValueError("empty: name the models the render services serve")
        return value

    @model_validator(mode="after")
    def _webhook_secrets(self) -> Settings:
        # Named by its variable in the message itself, never quoted (they are secrets).
        for number, secret in enumerate(self.webhook_secrets, start=1):
            try:
                webhook_key(secret.get_secret_value())
            except ValueError as exc:
                raise ValueError(
                    f"{self.variable('webhook_secrets')}: secret {number} of "
                    f"{len(self.webhook_secrets)} is not valid: {exc}"
                ) from None
        return self

    @model_validator(mode="after")
    def _served(self) -> Settings:
        if self.model not in self.served_models:
            # The choices are said, not the value given (what a refusal names and what it
            # never echoes: docs/configuration.md).
            raise ValueError(
                f"{self.variable('model')} must be one of {self.variable('served_models')} "
                f"({', '.join(self.served_models)})"
            )
        if not self.allow_non_commercial:
            for model in self.served_models:
                spec = spec_for(model)
                if not spec.commercial:
                    raise ValueError(
                        f"{self.variable('served_models')}: {model} is under the "
                        f"{spec.licence}; set {self.variable('allow_non_commercial')}=true to"
                        " serve it"
                    )
        return self

    @classmethod
    def variables(cls, name: str) -> tuple[str, ...]:
        """The environment variables that set the setting ``name`` (a field, or an alias of
        one), highest precedence first; ``()`` when it is none."""
        field = cls.model_fields.get(name)
        if field is None:
            field = next(
                (f for f in cls.model_fields.values() if name in _choices(f.validation_alias)),
                None,
            )
            if field is None:
                return ()
        aliases = _choices(field.validation_alias)
        if aliases:  # the variables are the aliases that are no field's name
            return tuple(a for a in aliases if a not in cls.model_fields)
        return (f"{cls.model_config.get('env_prefix', '')}{name}".upper(),)

    @classmethod
    def variable(cls, name: str) -> str:
        """The one variable to name for setting ``name``: the first of :meth:`variables` that
        is set in the environment, else the first (it may be in the ``.env`` file)."""
        names = cls.variables(name)
        present = {
            key.upper()
            for key, value in os.environ.items()
            if value or key.upper() not in _EMPTY_IS_UNSET
        }
        return next((v for v in names if v.upper() in present), names[0] if names else name)

    @classmethod
    def unknown_variables(
        cls, environ: dict[str, str] | None = None, dotenv: str | None = ".env"
    ) -> list[str]:
        """``IMAGEGEN_*`` variables set (in ``environ``, default the process's, or the
        ``dotenv`` file) that no setting reads, each with the setting it most resembles: a
        misspelled one is otherwise ignored without a word, and its default used. A variable
        an installed plugin declares it reads (its ``environment_variables``) is no such
        variable; the plugins are loaded to ask them only where one is set that no setting
        reads.

        Returns lines such as ``IMAGEGEN_MODLE is no setting (ignored); did you mean
        IMAGEGEN_MODEL?``.
        """
        import difflib

        names = set(_given(environ, dotenv))
        known = {v.upper() for field in cls.model_fields for v in cls.variables(field)}
        known |= _OTHER_VARIABLES
        unknown = [n for n in names if n.startswith("IMAGEGEN_") and n not in known]
        if unknown:
            from imagegen.plugins.discovery import declared_variables

            plugins = declared_variables()
            unknown = [n for n in unknown if n not in plugins]
        found = []
        for name in sorted(unknown):
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            found.append(f"{name} is no setting (ignored){hint}")
        return found

    def start_up_warnings(self) -> list[str]:
        """What a process should warn of once, at start-up: a safeguard of the prod profile
        turned off by a setting, or settings measured not to work together, which it would
        otherwise do without a word."""
        found = []
        if self.profile == "prod" and not self.auth_required:
            found.append(
                f"{self.variable('auth_required')}=false with {self.variable('profile')}=prod: "
                "authentication is off, every invocation is admitted without a token"
            )
        if self.render_fp8 and self.render_compile != "off":
            # Warned of, not refused: measured on one software stack (docs/benchmarks.md).
            found.append(
                f"{self.variable('render_fp8')}=true with "
                f"{self.variable('render_compile')}={self.render_compile}: the first render of "
                "this pair had not finished after 370 s as measured (torch 2.11, torchao 0.17;"
                f" docs/benchmarks.md); with {self.variable('render_warmup')}=true a render pod"
                " may never become ready"
            )
        return found

    @classmethod
    def given_as(cls, name: str, value: object) -> str:
        """The setting ``name`` at ``value`` as a message says it: ``IMAGEGEN_DEVICE=cuda``,
        and, where none of its variables is set (the environment, ``.env``) but the profile's
        defaults give it that value, ``IMAGEGEN_DEVICE=cuda (set by IMAGEGEN_PROFILE=prod)``:
        a user who never set the variable is told what did."""
        said = f"{cls.variable(name)}={value}"
        given = _given()
        if any(v.upper() in given for v in cls.variables(name)):
            return said
        profile = given.get(cls.variable("profile"), cls.model_fields["profile"].default)
        defaults = PROFILE_DEFAULTS.get(str(profile), {})
        if name in defaults and defaults[name] == value:
            return f"{said} (set by {cls.variable('profile')}={profile})"
        return said

    def revision_for(self, model: str) -> str | None:
        """The Hub revision to load ``model`` at: the setting, else the table's pin."""
        return self.model_revisions.get(model) or spec_for(model).revision

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        profile = data.get("profile", "dev")
        for key, value in PROFILE_DEFAULTS.get(str(profile), {}).items():
            data.setdefault(key, value)
        return data


def _given(environ: Mapping[str, str] | None = None, dotenv: str | None = ".env") -> dict[str, str]:
    """The variables set, by their upper-case names: ``environ`` (default the process's) over
    the ``dotenv`` file, as the settings read them; an unreadable file adds none (the settings
    say why)."""
    given: dict[str, str] = {}
    if dotenv is not None and os.path.isfile(dotenv):
        from dotenv import dotenv_values

        with contextlib.suppress(UnicodeDecodeError, OSError):
            given = {k.upper(): v or "" for k, v in dotenv_values(dotenv, encoding="utf-8").items()}
    given.update((k.upper(), v) for k, v in (os.environ if environ is None else environ).items())
    return given


def _refuse_unknown_keywords(
    settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
) -> None:
    """Refuse keyword arguments of ``Settings(...)`` that are no setting, naming each.

    ``extra="ignore"`` stays for the environment and ``.env``, which hold other programs'
    variables (:meth:`Settings.unknown_variables` warns of a misspelt ``IMAGEGEN_*`` one); a
    keyword is meant for the settings, and one misspelt (``modle``) would otherwise leave its
    setting at its default without a word. pydantic-settings' ``InitSettingsSource`` has by
    now renamed each keyword that names a setting (its field name or an alias, in any case)
    to that field's first alias or name: what is left under another name matched none.

    Raises:
        ValidationError: as ``extra="forbid"`` would, one ``extra_forbidden`` error a keyword,
            its value hidden.
    """
    given: dict[str, Any] = getattr(init_settings, "init_kwargs", {})
    accepted = {
        name
        for field_name, field in settings_cls.model_fields.items()
        for name in (field_name, field.alias, *_choices(field.validation_alias))
        if name
    }
    unknown = [key for key in given if key not in accepted]
    if unknown:
        raise ValidationError.from_exception_data(
            settings_cls.__name__,
            [
                InitErrorDetails(type="extra_forbidden", loc=(key,), input=given[key])
                for key in unknown
            ],
            hide_input=True,
        )


def _choices(alias: Any) -> tuple[str, ...]:
    if isinstance(alias, AliasChoices):
        return tuple(c for c in alias.choices if isinstance(c, str))
    return (alias,) if isinstance(alias, str) else ()
