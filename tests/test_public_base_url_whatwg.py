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

from imagegen.settings import _served_base_url
from imagegen.urls import public_url

# Node's WHATWG URL parser, as browsers and the Worker read URLs: .ci/run requires Node 20+.
NODE = shutil.which("node")

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
    assert NODE is not None, "Node 20 or later is needed: the WHATWG URL parser browsers use"
    done = subprocess.run(
        [NODE, "-e", _PARSE], input=json.dumps(urls), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    parsed: list[dict[str, str] | None] = json.loads(done.stdout)
    return parsed


def _taken(base: str) -> str | None:
    """``base`` as the settings take it, rewritten as browsers write it; None when refused."""
    try:
        return _served_base_url(base)
    except ValueError:
        return None


def _urls(base: str) -> list[str]:
    """The URLs persist writes from ``base`` as the settings took it: plain, signed, with a
    width."""
    return [
        public_url(base, KEY),
        public_url(base, KEY, secret=SECRET, ttl=60, now=0, width=512),
    ]


def _read_as_written(url: str, parsed: dict[str, str] | None) -> bool:
    """Whether the standard reads ``url`` exactly as written, its path the key alone."""
    return (
        parsed is not None
        and parsed["href"] == url
        and parsed["pathname"] == f"/{KEY}"
        and not (parsed["hash"] or parsed["username"] or parsed["password"])
    )


def _check_taken_bases(bases: list[str]) -> dict[str, str]:
    """Asserts that every base the settings take is taken as the standard writes it, and that
    every URL built from it is read as written; returns each base taken, as taken."""
    taken = {base: written for base in bases if (written := _taken(base)) is not None}
    for (base, written), parsed in zip(taken.items(), _whatwg(list(taken)), strict=True):
        assert parsed is not None and parsed["href"] == f"{written.rstrip('/')}/", (base, written)
    flat = [url for written in taken.values() for url in _urls(written)]
    for url, parsed in zip(flat, _whatwg(flat), strict=True):
        assert _read_as_written(url, parsed), (url, parsed)
    return taken


# Bases browsers read as written, as origins: each taken as it is.
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
    "https://images.example.com.",  # a trailing dot, kept by browsers, looked up alike
    "http://localhost.",
    "https://img_cdn.example.com",  # an underscore: DNS has them, browsers look them up
    "https://-a.example",
]

# Bases browsers rewrite, each taken as they write it: records hold what browsers request.
REWRITTEN = {
    "https://IMG.Example.com": "https://img.example.com",
    "https://XN--BCHER-KVA.example/": "https://xn--bcher-kva.example/",
    "https://img.example.com:443": "https://img.example.com",  # the default port, dropped
    "http://img.example.com:80/": "http://img.example.com/",
    "https://img.example.com:0443": "https://img.example.com",
    "https://img.example.com:08443": "https://img.example.com:8443",
    "https://img.example.com:": "https://img.example.com",  # an empty port, dropped
    "https://[2001:DB8::1]": "https://[2001:db8::1]",
    "https://[0:0::1]": "https://[::1]",
    "https://[2001:db8:0:0:1:0:0:1]": "https://[2001:db8::1:0:0:1]",
    "https://[1:0:0:2:0:0:0:3]": "https://[1:0:0:2::3]",
    "https://[::FFFF:1.2.3.4]": "https://[::ffff:102:304]",
    "https://[1:2:3:4:5:6:7::]": "https://[1:2:3:4:5:6:7:0]",
    "https://1.2.3": "https://1.2.0.3",
    "https://127.000.0.1": "https://127.0.0.1",
    "https://0x7f.1": "https://127.0.0.1",
    "https://1.2.3.4.": "https://1.2.3.4",
    "https://4294967295": "https://255.255.255.255",
}

# Bases browsers read otherwise, or refuse: each refused.
READ_OTHERWISE = [
    "https://img.example.com\\",  # "\\" is "/": the path is "//2026/...", served nowhere
    "https://img.example.com\\x",  # a path in disguise
    "https://img.example.com%2F",
    "https://img%2Eexample.com",  # decoded: give it decoded
    "https://img.example.com^",
    "https://img.example.com|x",
    "https://img.example.com<",
    "https://bücher.example",  # written xn--bcher-kva.example, by UTS #46
    "https://xn--a.example",  # no IDNA: refused
    "https://xn--.example",
    "https://xn--ab-fga.com",
    "https://img.example.123",  # ends in a number: read as IPv4, refused
    "https://img.0x1f",
    "https://1.2.3.256.",
    "https://4294967296",
    "https://1.2.3.4.5",
    "https://08.1.2.3",
    "https://[fe80::1%25eth0]",  # a zone: refused
    "https://[1::2::3]",
]


# Bases browsers read as written that are refused all the same: no DNS name, so nothing is
# reached at them; xn-- labels that IDNA 2003's tables cannot tell UTS #46 takes; a port
# nothing listens at.
NOT_TAKEN = [
    'https://a"b.com',
    "https://img.example.com;x",
    "https://img..example.com",
    "https://img.example.com..",
    "https://xn--ls8h.la",  # an emoji: not in Unicode 3.2
    "https://xn--zca.com",  # "ß": IDNA 2003 maps it to "ss"
    "https://img.example.com:0",  # no server listens there
]


def test_bases_browsers_read_are_taken_as_they_write_them_and_the_others_refused() -> None:
    """Each list both ways: a base browsers read as written is taken as it is, one they
    rewrite (an upper-case host, a default port, leading zeros, an IPv6 address written
    long) is taken as they write it, so records hold what they request, where the check
    before refused it and stopped every function at start-up; one they read otherwise or
    refuse is refused."""
    assert _check_taken_bases(READ_AS_WRITTEN) == {base: base for base in READ_AS_WRITTEN}
    assert _check_taken_bases(list(REWRITTEN)) == REWRITTEN
    assert all(_taken(written) == written for written in REWRITTEN.values())

    written = [f"{base.rstrip('/')}/{KEY}" for base in READ_OTHERWISE]
    for url, parsed in zip(written, _whatwg(written), strict=True):
        assert not _read_as_written(url, parsed), url
    assert _check_taken_bases(READ_OTHERWISE) == {}

    written = [f"{base}/{KEY}" for base in NOT_TAKEN]
    assert all(map(_read_as_written, written, _whatwg(written)))
    assert _check_taken_bases(NOT_TAKEN) == {}


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


def _random_ipv6(rng: random.Random) -> str:
    """An IPv6 address in brackets: pieces of hexadecimal in either case, with leading zeros,
    runs of zeros, a "::" or an IPv4 part; or junk."""
    pieces = [
        rng.choice(
            ["0", "00", "0000", "", f"{rng.randrange(1 << 16):X}", f"{rng.randrange(16):04x}"]
        )
        for _ in range(rng.choice([3, 7, 8, 8, 9]))
    ]
    if rng.random() < 0.2:
        pieces[-1] = ".".join(str(rng.choice([0, 1, 127, 255, 256])) for _ in range(4))
    text = ":".join(pieces)
    if rng.random() < 0.5:
        at = rng.randrange(len(text) + 1)
        text = text[:at] + "::" + text[at:]
    return f"[{text}{rng.choice(['', '', '%25x', 'g'])}]"


def test_every_base_taken_of_many_random_ones_is_read_as_written() -> None:
    """Hosts from names, numbers, hexadecimal, punycode of random text and junk, with ports
    and trailing text: whatever the settings take, they take as the standard writes it, and
    the URLs built from it the standard reads as written."""
    rng = random.Random(20260304)
    tails = ["", "/", ":8443", ":443", ":08443", ":0", ":", "\\", "/x", ":8443/"]
    bases = [
        f"{rng.choice(['http', 'https'])}://{host(rng)}{rng.choice(tails)}"
        for host in (_random_host, _random_ipv6)
        for _ in range(5000)
    ]
    taken = _check_taken_bases(bases)
    assert len(taken) > 1000  # the generators make enough good hosts to test anything
    assert sum(base != written for base, written in taken.items()) > 300  # and rewritten ones
