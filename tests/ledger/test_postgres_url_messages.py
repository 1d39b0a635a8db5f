"""What a PostgreSQL ledger URL that libpq cannot read is said to have wrong: libpq's own
refusal, read by psycopg, put in words that quote none of the URL but an unknown parameter's
name (libpq's fe-connect.c: conninfo_uri_parse_options, _parse_params, conninfo_uri_decode)."""

from __future__ import annotations

import pytest

from imagegen.errors import ConfigurationError
from imagegen.ledger.postgres import _unreadable, read_url

pytest.importorskip("psycopg")

SECRET = "Hunter2Secret"
HINT = "; a '%' in it is written %25"


def said(url: str) -> str:
    """The reason read_url gives for refusing ``url``."""
    with pytest.raises(ConfigurationError) as error:
        read_url(url)
    message = error.value.message
    prefix = "the ledger URL is no PostgreSQL connection URL ("
    assert message.startswith(prefix) and message.endswith(")"), message
    assert error.value.errors == [
        {"field": "ledger_url", "message": message[len("the ledger URL ") :]}
    ]
    return message[len(prefix) : -1]


@pytest.mark.parametrize(
    "password",
    [
        # libpq 18 refuses the spaces, older ones the bare '%': both quote the password whole.
        f'invalid URI query parameter: "{SECRET}"%zz',
        f'x%zz invalid URI query parameter: "{SECRET}"',
        f'invalid%20URI%20query%20parameter:%20"{SECRET}"%zz',
        f'unknown connection parameter "{SECRET}"%00',
    ],
)
def test_a_password_that_reads_as_another_refusal_is_never_quoted(password: str) -> None:
    reason = said(f"postgresql://bob:{password}@127.0.0.1:9/db?sslmode=require")

    assert SECRET not in reason
    assert "parameter" not in reason  # not taken for an unknown parameter's refusal


@pytest.mark.parametrize(
    "password", [f"/Kq7?{SECRET}=Zz9", f"8812/q?{SECRET}=Zz", f"x#/?{SECRET}=1"]
)
def test_a_password_libpq_reads_as_a_path_and_query_is_never_quoted(password: str) -> None:
    """A bare / in a password ends the credentials where libpq reads them: the rest of the
    password is its path and query, and libpq names its "parameter", which is the password's."""
    reason = said(f"postgresql://ledger:{password}@db.internal/ledger")

    assert SECRET not in reason
    assert reason == "an unknown connection parameter"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://bob:pw@h/db?sslmod=require", "unknown connection parameter 'sslmod'"),
        ("postgresql://bob:pw@h/db?ss%6Cmod=require", "unknown connection parameter 'sslmod'"),
        ('postgresql://bob:pw@h/db?pass"word=1', "an unknown connection parameter"),
        # A '[' is an IPv6 host's only where a host starts: in the database name it is a letter.
        ("postgresql://bob:pw@h/d[b?sslmod=require", "unknown connection parameter 'sslmod'"),
        ("postgresql://bob:pw@h,[::1]:5/d[b?sslmod=1", "unknown connection parameter 'sslmod'"),
        ("postgresql://bob:pw@[::1]:5432/db?sslmod=1", "unknown connection parameter 'sslmod'"),
        # Within an IPv6 host's brackets, anything up to the ']' is the host's ('[' or '?').
        ("postgresql://bob:pw@[a[b?x]:5432/db?sslmod=1", "unknown connection parameter 'sslmod'"),
        ("postgresql://bob:pw@h/db?sslmode", "a query parameter without '=' (?name=value)"),
        ("postgresql://bob:pw@h/db?a=b=c", "a query parameter with a second '='"),
        ("postgresql://bob:pa%zzss@h/db", f"a '%' not followed by two hex digits{HINT}"),
        ("postgresql://bob:S3cr3t%@h/db", f"a '%' not followed by two hex digits{HINT}"),
        ("postgresql://bob:p%00x@h/db", f"%00 in it, which libpq refuses{HINT}"),
        ("postgresql://bob:pw@[::1/db", "its IPv6 host has no closing ']'"),
        ("postgresql://bob:pw@[]/db", "its IPv6 host is empty"),
        ("postgresql://bob:pw@[::1]x/db", "no ':' or '/' after its IPv6 host's ']'"),
    ],
)
def test_each_refusal_is_said_in_its_own_words(url: str, reason: str) -> None:
    assert said(url) == reason


def test_a_space_in_a_part_is_said_where_libpq_refuses_it() -> None:
    """libpq 18 refuses a space within a part ("unexpected spaces found in ..."); older
    versions read it as part of the value."""
    import psycopg

    url = "postgresql://bob:two words@h/db"
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        pass
    else:
        pytest.skip(f"libpq {psycopg.pq.version()} reads a space within a part")

    reason = said(url)

    assert reason == "a space within one of its parts (a space is written %20)"
    assert "two" not in reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "postgresql://bob:Top%25Secret@h/db?sslmod=require",
            "unknown connection parameter 'sslmod'",
        ),
        (
            "postgresql://bob:Top%25Secret@h/db?sslmode",
            "a query parameter without '=' (?name=value)",
        ),
        ("postgresql://bob:Top%25Secret@h/db?a=b=c", "a query parameter with a second '='"),
        ("postgresql://bob:Top%25Secret@[::1/db", "its IPv6 host has no closing ']'"),
    ],
)
def test_a_percent_not_at_fault_is_not_told_how_to_write(url: str, reason: str) -> None:
    assert said(url) == reason


# libpq's messages as older versions word them (libpq 15's fe-connect.c; the bundled libpq may
# be another), and as no URL of these tests makes libpq say them.
@pytest.mark.parametrize(
    ("message", "url", "reason"),
    [
        (
            f'invalid percent-encoded token: "invalid URI query parameter: "{SECRET}"%zz"',
            f'postgresql://u:invalid URI query parameter: "{SECRET}"%zz@h/db',
            f"a '%' not followed by two hex digits{HINT}",
        ),
        # An unknown parameter libpq names that the URL's query does not: the password's text.
        (
            f'invalid URI query parameter: "{SECRET}"\n',
            f"postgresql://u:a?{SECRET}=1@h/db?sslmod=require",
            "an unknown connection parameter",
        ),
        (
            'invalid URI query parameter: "sslmod"\n',
            f"postgresql://u:{SECRET}@h/db?sslmod=require",
            "unknown connection parameter 'sslmod'",
        ),
        ("out of memory\n", f"postgresql://u:{SECRET}@h/db", "libpq cannot read it"),
        (f"{SECRET} invalid percent-encoded token", "postgresql://u@h/db%", "libpq cannot read it"),
    ],
)
def test_messages_of_other_libpq_versions(message: str, url: str, reason: str) -> None:
    assert _unreadable(message, url) == reason


def test_a_url_of_many_brackets_is_read_in_linear_time() -> None:
    """Each ']' is looked for once: 150,000 hosts, or '['s never closed, are read in a
    fraction of a second (a scan to the end for each '[' took a minute)."""
    import time

    from imagegen.ledger.postgres import _query_names

    started = time.monotonic()
    assert _query_names("postgresql://" + ",[" * 150_000 + "/db?sslmod=1") == set()  # refused
    assert _query_names("postgresql://" + ",[::1]" * 150_000 + "/db?sslmod=1") == {"sslmod"}
    assert _query_names("postgresql://" + ",[" * 150_000 + "]/db?sslmod=1") == {"sslmod"}
    assert time.monotonic() - started < 10  # a hang's bound, not a measurement
