"""``IMAGEGEN_PUBLIC_BASE_URL`` against the URL parser browsers and the Worker use.

Every public URL persist writes is the base and a key, kept for good in records and events.
Browsers and the Worker (``new URL`` in worker/src/index.ts, then ``keyFromPath`` in
worker/src/keys.ts) read it by the WHATWG URL Standard, not as urllib does: a base they read
otherwise (a backslash taken for ``/``, an upper-case host written in lower case) or refuse
(``"`` or ``^`` in a host) broke every URL. Node's ``URL`` is that standard's parser (ada); the
Worker's tests run on Node too, so it is there wherever the suite runs in full.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from imagegen.errors import InvalidRequest
from imagegen.urls import public_url

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node's WHATWG URL parser")

KEY = "2026/03/04/abc.png"
SECRET = "test-secret-of-16-bytes"

# Each parsed by Node's URL: its parts, or null when it refuses the text.
_PARSE = """
const urls = JSON.parse(require("fs").readFileSync(0, "utf8"));
console.log(JSON.stringify(urls.map((text) => {
  try {
    const u = new URL(text);
    return {href: u.href, host: u.host, pathname: u.pathname, search: u.search, hash: u.hash,
            username: u.username, password: u.password};
  } catch {
    return null;
  }
})));
"""


def _whatwg(urls: list[str]) -> list[dict[str, str] | None]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "-e", _PARSE], input=json.dumps(urls), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    parsed: list[dict[str, str] | None] = json.loads(done.stdout)
    return parsed


def _urls(base: str) -> list[str] | None:
    """The URLs persist writes from ``base`` (plain, signed, with a width); None when refused."""
    try:
        return [
            public_url(base, KEY),
            public_url(base, KEY, secret=SECRET, ttl=60, now=0, width=512),
        ]
    except InvalidRequest as refused:
        assert refused.fields == ["base_url"]
        return None


def _read_as_written(url: str, parsed: dict[str, str] | None) -> bool:
    """Whether the standard reads ``url`` exactly as written, its path the key alone."""
    return (
        parsed is not None
        and parsed["href"] == url
        and parsed["pathname"] == f"/{KEY}"
        and not (parsed["hash"] or parsed["username"] or parsed["password"])
    )


def _check_taken_bases(bases: list[str]) -> list[str]:
    """Asserts that every URL built from a base the settings take is read as written; returns
    the bases taken."""
    built = {base: urls for base in bases if (urls := _urls(base)) is not None}
    flat = [url for urls in built.values() for url in urls]
    for url, parsed in zip(flat, _whatwg(flat), strict=True):
        assert _read_as_written(url, parsed), (url, parsed)
    return list(built)


# Bases browsers read as written, as origins: each taken.
READ_AS_WRITTEN = [
    "https://img.example.com",
    "https://img.example.com/",
    "http://127.0.0.1:8787",
    "https://[::1]:8443/",
    "https://[2001:db8::1]",
    "https://xn--bcher-kva.example",  # bücher.example, as browsers write it
    "https://a-b.example",
    "https://ab--cd.example",
    "https://img.0x1g",  # no number: a name
    "https://localhost:1",
    "https://img.example.com:65535",
]

# Bases browsers read otherwise, or refuse: each refused.
READ_OTHERWISE = [
    "https://img.example.com\\",  # "\\" is "/": the path is "//2026/...", served nowhere
    "https://img.example.com\\x",  # a path in disguise
    "https://img.example.com%2F",
    "https://img.example.com^",
    "https://img.example.com|x",
    "https://img.example.com<",
    "https://img.example.com:",  # an empty port, dropped
    "https://img.example.com:443",  # the default port, dropped
    "http://img.example.com:80",
    "https://img.example.com:08443",  # written 8443
    "https://IMG.Example.com",  # written in lower case
    "https://bücher.example",  # written xn--bcher-kva.example
    "https://xn--a.example",  # no IDNA: refused
    "https://xn--.example",
    "https://xn--ab-fga.com",
    "https://img.example.123",  # ends in a number: read as IPv4, refused
    "https://img.0x1f",
    "https://1.2.3",  # read as 1.2.0.3
    "https://127.000.0.1",  # read as 127.0.0.1
    "https://0x7f.0.0.1",
    "https://[0:0::1]",  # written [::1]
    "https://[::FFFF:1.2.3.4]",  # written [::ffff:102:304]
    "https://[::ffff:1.2.3.4]",
    "https://[fe80::1%25eth0]",  # a zone: refused
]


# Bases browsers read as written that are refused all the same: no DNS name, so no certificate
# or DNS record names them; xn-- labels that IDNA 2003's tables cannot tell UTS #46 takes; a
# port nothing listens at.
NOT_TAKEN = [
    'https://a"b.com',
    "https://img.example.com;x",
    "https://img_example.com",
    "https://img.example.com.",
    "https://-a.example",
    "https://xn--ls8h.la",  # an emoji: not in Unicode 3.2
    "https://xn--zca.com",  # "ß": IDNA 2003 maps it to "ss"
    "https://img.example.com:0",  # no server listens there
]


def test_bases_read_as_written_are_taken_and_the_others_refused() -> None:
    """Both ways on the lists: each base browsers read as written is taken, and each one they
    read otherwise or refuse is refused, where before urllib took all but the last few."""
    assert _check_taken_bases(READ_AS_WRITTEN) == READ_AS_WRITTEN

    written = [f"{base.rstrip('/')}/{KEY}" for base in READ_OTHERWISE]
    for url, parsed in zip(written, _whatwg(written), strict=True):
        assert not _read_as_written(url, parsed), url
    assert _check_taken_bases(READ_OTHERWISE) == []

    written = [f"{base}/{KEY}" for base in NOT_TAKEN]
    assert all(map(_read_as_written, written, _whatwg(written)))
    assert _check_taken_bases(NOT_TAKEN) == []


def _random_host(rng: random.Random) -> str:
    """A host of labels that are names, numbers, punycode of random text, or junk."""
    junk = "aZz09-_.%~\\/^|<>\"'`{}[]:@;,!$&()*+=?# \u00e4\u00df\u0301\u200d\uff0e"
    labels = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0:
            labels.append("".join(rng.choices("abcxyz019-", k=rng.randint(1, 6))))
        elif kind == 1:
            labels.append(str(rng.choice([0, 1, 7, 255, 256, 4294967295])))
        elif kind == 2:
            labels.append("0x" + "".join(rng.choices("0123456789abcdefg", k=rng.randint(0, 3))))
        elif kind == 3:
            text = "".join(
                chr(rng.choice([rng.randint(0x61, 0x7A), rng.randint(0xA0, 0x2FFFF)]))
                for _ in range(rng.randint(1, 4))
            )
            try:
                labels.append("xn--" + text.encode("punycode").decode("ascii"))
            except UnicodeError:
                labels.append(text)
        else:
            labels.append("".join(rng.choices(junk, k=rng.randint(1, 4))))
    return ".".join(labels)


def test_every_base_taken_of_many_random_ones_is_read_as_written() -> None:
    """Hosts from names, numbers, hexadecimal, punycode of random text and junk, with ports
    and trailing text: whatever the settings take, the standard reads as written."""
    rng = random.Random(20260304)
    tails = ["", "/", ":8443", ":443", ":0", ":", "\\", "/x", ":8443/"]
    bases = [
        f"{rng.choice(['http', 'https'])}://{_random_host(rng)}{rng.choice(tails)}"
        for _ in range(5000)
    ]
    taken = _check_taken_bases(bases)
    assert len(taken) > 200  # the generator makes enough good hosts to test anything
