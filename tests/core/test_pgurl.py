"""A PostgreSQL URL split as libpq splits it (libpq's fe-connect.c,
conninfo_uri_parse_options), checked against libpq itself through psycopg."""

from __future__ import annotations

from urllib.parse import unquote

import hypothesis
import pytest
from hypothesis import strategies as st

from imagegen._pgurl import PostgresUrl, split_postgres_url


@pytest.mark.parametrize(
    ("url", "split"),
    [
        ("postgresql://db", PostgresUrl(None, (("db", None),), "")),
        (
            "postgres://pg:pw@db:5432/ledger?sslmode=require",
            PostgresUrl("pg:pw", (("db", "5432"),), "/ledger?sslmode=require"),
        ),
        # The credentials end at the first "@" before any "/": a password may hold "?", "#",
        # "[" or "]"; an "@" after a "/" is the path's.
        ("postgresql://pg:p?x#[]@db/d", PostgresUrl("pg:p?x#[]", (("db", None),), "/d")),
        ("postgresql://db/a@b", PostgresUrl(None, (("db", None),), "/a@b")),
        (
            "postgresql://a:1,[::1]:2,,b:/d?port=3",
            PostgresUrl(None, (("a", "1"), ("::1", "2"), ("", None), ("b", "")), "/d?port=3"),
        ),
        # Within an IPv6 host's brackets, anything up to the "]" is the host's.
        ("postgresql://[a[b?x]:5/d", PostgresUrl(None, (("a[b?x", "5"),), "/d")),
        # A "[" is an IPv6 host's only where a host starts: in the database name it is a letter.
        ("postgresql://h/d[b?x=1", PostgresUrl(None, (("h", None),), "/d[b?x=1")),
        ("postgresql:///d?host=/run", PostgresUrl(None, (("", None),), "/d?host=/run")),
        ("postgresql://h,[::1/d", PostgresUrl(None, (("h", None),), "", "unclosed")),
        ("postgresql://[::1]x/d", PostgresUrl(None, (), "", "unexpected")),
    ],
)
def test_a_url_is_split_as_libpq_splits_it(url: str, split: PostgresUrl) -> None:
    assert split_postgres_url(url) == split


@pytest.mark.parametrize(
    ("rest", "query"), [("/d?a=1&b", "a=1&b"), ("?", ""), ("/d", None), ("", None)]
)
def test_the_query_follows_the_first_question_mark_past_the_hosts(
    rest: str, query: str | None
) -> None:
    assert PostgresUrl(None, (), rest).query == query


# The characters that end or begin each part of a URL for libpq, and a few of a host's or a
# port's; no "=" with a key word before it, or the query would set the host or port itself.
_PIECES = st.sampled_from(
    ["[", "]", ":", "/", "?", ",", "@", "a", "1", "%35", "::1", "db", "&x=1", "#"]
)


@hypothesis.given(st.lists(_PIECES, max_size=12).map("".join))
@hypothesis.settings(max_examples=500, deadline=None)
def test_the_hosts_and_ports_are_those_libpq_reads(tail: str) -> None:
    """Where libpq reads a URL, its hosts and ports are those split here (decoded, joined by
    commas, as libpq stores them); where it refuses the hosts, so does the split, but for an
    empty IPv6 address (``[]``), split as an empty host."""
    psycopg = pytest.importorskip("psycopg")
    url = f"postgresql://{tail}"
    split = split_postgres_url(url)
    try:
        read = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        if "may not be empty" not in str(exc):  # "[]": refused before what follows it
            refused_hosts = "IPv6 host" in str(exc) or "unexpected character" in str(exc)
            assert (split.problem is not None) == refused_hosts, exc
        return
    assert split.problem is None
    hosts = ",".join(unquote(host) for host, _ in split.hosts)
    ports = ",".join(unquote(port or "") for _, port in split.hosts)
    assert (read.get("host", ""), read.get("port", "")) == (hosts, ports)


def test_many_hosts_are_split_in_linear_time() -> None:
    """Each part is read once from where the last one ended: 100,000 hosts in a fraction of
    a second."""
    import time

    started = time.monotonic()
    split = split_postgres_url("postgresql://" + "[::1]:5432," * 100_000 + "/db?port=1")
    assert len(split.hosts) == 100_001 and split.query == "port=1"
    assert time.monotonic() - started < 5  # a hang's bound, not a measurement
