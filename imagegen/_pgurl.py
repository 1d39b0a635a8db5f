"""A PostgreSQL connection URL split as libpq splits it, not as a web URL.

libpq's ``conninfo_uri_parse_options`` (src/interfaces/libpq/fe-connect.c): after
``scheme://`` the credentials end at the first ``@`` before any ``/`` (so a password may hold
``?``, ``#``, ``[`` or ``]``); then comma-separated hosts, each ``[IPv6]`` or a name up to
``:``, ``/``, ``?`` or ``,``, with an optional ``:port`` up to ``/``, ``?`` or ``,``; then
``/dbname`` and ``?params``. Read without psycopg (the settings check a ledger URL at every
function's start), in one pass: linear in the URL's length, however many hosts it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["PostgresUrl", "split_postgres_url"]

_CREDENTIALS = re.compile(r"[^@/]*@")
# One host: "[IPv6]" (its "]" missing where the URL has none left), or a name up to ":", "/",
# "?" or ","; then ":port" up to "/", "?" or ",".
_HOST = re.compile(r"(?:\[([^\]]*)(\]?)|([^:/?,]*))(?::([^/?,]*))?")


@dataclass(frozen=True)
class PostgresUrl:
    """The parts of a PostgreSQL URL, each as written (still percent-encoded).

    Attributes:
        credentials: ``user[:password]`` before the ``@``; None where there is no ``@``
            before the first ``/``.
        hosts: Each host and its port, in order: an IPv6 address without its brackets (``[]``,
            which libpq refuses, as an empty host); the port None where no ``:`` follows the
            host, ``""`` where one does with nothing after it.
        rest: What follows the hosts: ``/dbname?params``, either part absent; ``""`` where
            libpq refuses the hosts.
        problem: Why libpq refuses the hosts, else None: ``"unclosed"``, a ``[`` with no
            ``]`` after it; ``"unexpected"``, a character after an IPv6 host's ``]`` other
            than ``:``, ``/``, ``?`` or ``,``.
    """

    credentials: str | None
    hosts: tuple[tuple[str, str | None], ...]
    rest: str
    problem: Literal["unclosed", "unexpected"] | None = None

    @property
    def query(self) -> str | None:
        """The text after the first ``?`` past the hosts (``a=1&b=2``); None where none is."""
        _, mark, after = self.rest.partition("?")
        return after if mark else None


def split_postgres_url(url: str) -> PostgresUrl:
    """``url`` (``postgresql://…`` or ``postgres://…``) split as libpq splits it."""
    text = url.partition("://")[2]
    found = _CREDENTIALS.match(text)
    credentials = found[0][:-1] if found else None
    pos = found.end() if found else 0
    hosts: list[tuple[str, str | None]] = []
    while True:
        host = _HOST.match(text, pos)
        if host is None:  # pragma: no cover - it matches the empty text
            break
        ipv6, closed, name, port = host.groups()
        if ipv6 is not None and not closed:
            return PostgresUrl(credentials, tuple(hosts), "", "unclosed")
        pos = host.end()
        after = text[pos : pos + 1]
        if after not in ("", ",", "/", "?"):  # only after an IPv6 host's "]"
            return PostgresUrl(credentials, tuple(hosts), "", "unexpected")
        hosts.append((name if ipv6 is None else ipv6, port))
        if after != ",":
            break
        pos += 1
    return PostgresUrl(credentials, tuple(hosts), text[pos:])
