"""Tests of imagegen.urls against the shared vectors and the URL contract."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr, ValidationError

from imagegen import ImageGenService
from imagegen.errors import InvalidRequest
from imagegen.settings import MAX_SIGNED_URL_TTL, Settings
from imagegen.urls import (
    GALLERY_PATH_PATTERN,
    canonical_query,
    gallery_url,
    is_public_key,
    public_url,
    sign,
    verify,
)
from tests.fakes.images import gradient_png, store_rendered

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
VECTORS_PATH = SCHEMAS / "signed-url-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
BASE = VECTORS["base_url"]
SECRET = "test-secret-of-16-bytes"


VALID = [v for v in VECTORS["vectors"] if v["valid"]]


def _name(vector: dict[str, Any]) -> str:
    return str(vector["name"])


# 1. The shared vectors


def test_vectors_cover_valid_and_invalid() -> None:
    valid = [v["valid"] for v in VECTORS["vectors"]]
    assert any(valid) and not all(valid)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=_name)
def test_verify_matches_vector(vector: dict[str, Any]) -> None:
    result = verify(
        vector["key"],
        vector["expires"],
        vector["signature"],
        vector["secret"],
        now=vector["now"],
        params=vector["params"],
    )
    assert result is vector["valid"]


@pytest.mark.parametrize("vector", VALID, ids=_name)
def test_sign_reproduces_valid_vector(vector: dict[str, Any]) -> None:
    signature = sign(vector["key"], vector["expires"], vector["secret"], params=vector["params"])
    assert signature == vector["signature"]


# The URL builders mint URLs with a positive lifetime and no parameter but the width.
MINTABLE = [v for v in VALID if v["expires"] > v["now"] and set(v["params"]) <= {"w"}]


@pytest.mark.parametrize("vector", MINTABLE, ids=_name)
def test_url_builders_reproduce_valid_vector(vector: dict[str, Any]) -> None:
    ttl = vector["expires"] - vector["now"]
    signing = {"secret": vector["secret"], "ttl": ttl, "now": vector["now"]}
    if GALLERY_PATH_PATTERN.match(vector["key"]):
        url = gallery_url(BASE, vector["key"], **signing)
    else:
        width = int(vector["params"]["w"]) if "w" in vector["params"] else None
        url = public_url(BASE, vector["key"], width=width, **signing)
    assert url == vector["url"]


def test_vectors_cover_parameters_derivatives_and_the_gallery() -> None:
    keys = {v["key"] for v in VALID}
    assert any(v["params"] for v in VALID)
    assert any(k.endswith(".avif") for k in keys) and any(k.endswith(".w1024.webp") for k in keys)
    assert "" in keys and any(k.endswith("/") for k in keys)


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=_name)
def test_vector_url_carries_its_fields(vector: dict[str, Any]) -> None:
    parts = urlsplit(vector["url"])
    assert f"{parts.scheme}://{parts.netloc}" == BASE
    assert parts.path == "/" + vector["key"]
    query = parse_qs(parts.query, keep_blank_values=True)
    params = {name: [value] for name, value in vector["params"].items()}
    signed = {"expires": [str(vector["expires"])], "signature": [vector["signature"]]}
    assert query == params | signed


# 2. Signing and verifying


def test_sign_is_lowercase_hex_sha256() -> None:
    signature = sign("2026/01/02/abc.png", 1, SECRET)
    assert len(signature) == 64
    assert signature == signature.lower()
    int(signature, 16)


def test_verify_round_trip_and_expiry() -> None:
    key = "2026/01/02/abc.png"
    signature = sign(key, 1000, SECRET)
    assert verify(key, 1000, signature, SECRET, now=999)
    assert verify(key, 1000, signature, SECRET, now=1000)
    assert not verify(key, 1000, signature, SECRET, now=1001)
    assert not verify(key, 1000, signature, "other", now=999)


def test_verify_defaults_to_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "2026/01/02/abc.png"
    signature = sign(key, 1000, SECRET)
    monkeypatch.setattr("imagegen.urls.time.time", lambda: 1000.9)
    assert verify(key, 1000, signature, SECRET)
    monkeypatch.setattr("imagegen.urls.time.time", lambda: 1001.0)
    assert not verify(key, 1000, signature, SECRET)


def test_parameters_are_signed_in_canonical_order() -> None:
    key = "2026/01/02/abc.png"
    assert canonical_query({"w": 512, "a b": "x/y", "expires": 1}) == "a%20b=x%2Fy&w=512"
    signature = sign(key, 1000, SECRET, params={"w": "512", "z": "1"})
    assert signature == sign(key, 1000, SECRET, params={"z": "1", "w": "512"})
    assert signature != sign(key, 1000, SECRET, params={"w": "256", "z": "1"})
    assert verify(key, 1000, signature, SECRET, now=0, params={"z": "1", "w": "512"})
    assert not verify(key, 1000, signature, SECRET, now=0)
    # Without parameters the message is the original one: older URLs stay valid.
    assert sign(key, 1000, SECRET, params={}) == sign(key, 1000, SECRET)


def test_verify_refuses_non_ascii_signature() -> None:
    assert not verify("2026/01/02/abc.png", 1000, "é" * 64, SECRET, now=0)


# 3. Key shapes


@pytest.mark.parametrize(
    "key",
    [
        "2026/05/01/abc.png",
        "2026/05/01/abc.thumb.webp",
        "2026/05/01/abc.w256.avif",
        "2026/05/01/abc.w1024.webp",
        "2026/05/01/abc.w99999.webp",
        "2026/12/31/A_b-C.png",
        "2026/01/09/0.png",
        "0001/10/10/" + "a" * 128 + ".png",
    ],
)
def test_is_public_key_accepts(key: str) -> None:
    assert is_public_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "2026/05/01/abc.json",
        "2026/05/01/abc.webp",
        "2026/05/01/abc.thumb.png",
        "2026/05/01/abc.w0256.avif",
        "2026/05/01/abc.w256.png",
        "2026/05/01/abc.w.avif",
        "2026/05/01/abc.w100000.webp",
        "2026/05/01/abc.w256.AVIF",
        "2026/05/01/abc.PNG",
        "2026/05/01/a.b.png",
        "2026/05/01/_abc.png",
        "2026/05/01/-abc.png",
        "2026/05/01/.png",
        "2026/05/01/" + "a" * 129 + ".png",
        "2026/13/01/abc.png",
        "2026/00/01/abc.png",
        "2026/05/00/abc.png",
        "2026/05/32/abc.png",
        "2026/5/01/abc.png",
        "26/05/01/abc.png",
        "/2026/05/01/abc.png",
        "2026/05/01//abc.png",
        "2026/05/01/../abc.png",
        "2026/05/01/abc%2Fx.png",
        "images/2026/05/01/abc.png",
        "2026/05/01/abc.png\n",
        "2026/05/01/abc.png?x=1",
        "\u0662\u0660\u0662\u0666/05/01/abc.png",
        "",
    ],
)
def test_is_public_key_refuses(key: str) -> None:
    assert not is_public_key(key)


# 4. Building URLs


@pytest.mark.parametrize("base", ["https://img.example.com", "https://img.example.com/"])
def test_public_url_joins_with_one_slash(base: str) -> None:
    assert public_url(base, "2026/05/01/abc.png") == "https://img.example.com/2026/05/01/abc.png"


@pytest.mark.parametrize(
    "base",
    [
        "https://img.example.com/sub/path?x",
        "https://cdn.example.com/images/",
        "https://img.example.com/?v=1",
        "https://img.example.com?",
        "https://img.example.com/#top",
        "https://user:pass@img.example.com",
        "https://img.example.com\n",
        "ftp://img.example.com",
        "img.example.com",
    ],
)
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_base_that_is_not_an_origin(build: Any, base: str) -> None:
    """The Worker takes the key from the whole path (``keyFromPath`` in worker/src/keys.ts):
    ``https://img.example.com/sub/path?x/2026/...`` serves nothing. The builders hold a base
    given by hand to the rule ``IMAGEGEN_PUBLIC_BASE_URL`` is held to."""
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(base, target)
    assert info.value.fields == ["base_url"]
    with pytest.raises(ValidationError) as refused:
        Settings(public_base_url=base)
    assert info.value.errors[0]["message"] in str(refused.value)


@pytest.mark.parametrize(
    "base",
    [
        "https://img.example.com",
        "https://img.example.com/",
        "http://127.0.0.1:8787",
        "https://img.example.com/images",
        "https://img.example.com/images/",
        "https://img.example.com/?v=1",
        "https://img.example.com?",
        "https://img.example.com/#top",
    ],
)
def test_every_base_the_settings_take_makes_urls_whose_path_is_the_key(base: str) -> None:
    """The Worker takes the key from the whole path (``keyFromPath`` in worker/src/keys.ts)
    and checks the signature over it: a base the settings take must not put anything before
    the key or after it, or every URL persist writes, once and for good, is broken."""
    key = "2026/05/01/abc.png"
    try:
        taken = Settings(public_base_url=base).public_base_url
    except ValidationError as refused:
        assert "the Worker serves keys at the root of its host" in str(refused)
        return
    assert taken is not None
    url = urlsplit(public_url(taken, key, secret=SECRET, ttl=60, now=0))
    assert (url.path, url.fragment) == (f"/{key}", "")
    query = parse_qs(url.query)
    assert set(query) == {"expires", "signature"}
    assert verify(url.path.removeprefix("/"), 60, query["signature"][0], SECRET, now=0)


@pytest.mark.parametrize(
    ("base", "written"),
    [
        ("https://IMG.example.com", "https://img.example.com"),
        ("https://img.example.com:443/", "https://img.example.com"),
        ("http://127.1:080", "http://127.0.0.1"),
        ("https://[2001:DB8:0::1]", "https://[2001:db8::1]"),
    ],
)
def test_url_builders_write_the_base_as_the_settings_keep_it(base: str, written: str) -> None:
    """A URL built by hand (re-issued after a secret leaked) is the one persist wrote with the
    same configured base: written as browsers write it, as the settings keep it."""
    assert (Settings(public_base_url=base).public_base_url or "").rstrip("/") == written
    key = "2026/05/01/abc.png"
    assert public_url(base, key) == f"{written}/{key}"
    assert gallery_url(base, "2026/05/01") == f"{written}/2026/05/01/"


def test_public_url_signed_expires_after_ttl() -> None:
    url = public_url(BASE, "2026/05/01/abc.png", secret=SECRET, ttl=60, now=1_000)
    query = parse_qs(urlsplit(url).query)
    assert query["expires"] == ["1060"]
    assert verify("2026/05/01/abc.png", 1060, query["signature"][0], SECRET, now=1_060)


def test_public_url_signed_default_ttl_is_one_week(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagegen.urls.time.time", lambda: 5_000.5)
    url = public_url(BASE, "2026/05/01/abc.png", secret=SECRET)
    assert parse_qs(urlsplit(url).query)["expires"] == [str(5_000 + 604_800)]


def test_public_url_with_a_width() -> None:
    assert public_url(BASE, "2026/05/01/abc.png", width=300).endswith("/abc.png?w=300")
    url = public_url(BASE, "2026/05/01/abc.png", width=300, secret=SECRET, ttl=60, now=0)
    query = parse_qs(urlsplit(url).query)
    assert query["w"] == ["300"]
    assert verify("2026/05/01/abc.png", 60, query["signature"][0], SECRET, now=0, params={"w": 300})


@pytest.mark.parametrize(
    ("key", "width"),
    [("2026/05/01/abc.png", 0), ("2026/05/01/abc.png", 8193), ("2026/05/01/abc.w256.avif", 9)],
)
def test_public_url_refuses_a_bad_width(key: str, width: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        public_url(BASE, key, width=width)
    assert info.value.fields == ["width"]


@pytest.mark.parametrize("width", [True, False, 512.0, 200.5, "512"])
def test_public_url_refuses_a_width_that_is_not_a_whole_number(width: Any) -> None:
    """The Worker takes only digits for ``w`` (``widthParam`` in worker/src/negotiate.ts):
    ``w=True``, ``w=512.0`` or ``w=200.5`` would answer 400."""
    with pytest.raises(InvalidRequest) as info:
        public_url(BASE, "2026/05/01/abc.png", width=width)
    assert info.value.fields == ["width"]


@pytest.mark.parametrize("width", [1, 8192])
def test_public_url_takes_the_widths_at_either_end(width: int) -> None:
    url = public_url(BASE, "2026/05/01/abc.png", width=width, secret=SECRET, ttl=60, now=0)
    query = parse_qs(urlsplit(url).query)
    assert query["w"] == [str(width)]
    params = {"w": width}
    assert verify("2026/05/01/abc.png", 60, query["signature"][0], SECRET, now=0, params=params)


@pytest.mark.parametrize("ttl", [True, 60.0, 0.5])
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_ttl_that_is_not_a_whole_number(build: Any, ttl: Any) -> None:
    """``expires`` must be digits alone (``EXPIRES_PATTERN`` in worker/src/signing.ts):
    ``expires=60.0`` would answer 403."""
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(BASE, target, secret=SECRET, ttl=ttl, now=0)
    assert info.value.fields == ["ttl"]


@pytest.mark.parametrize("ttl", [-1, MAX_SIGNED_URL_TTL + 1, 10**16])
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_ttl_out_of_range(build: Any, ttl: int) -> None:
    """A lifetime past the one ``IMAGEGEN_SIGNED_URL_TTL`` may have can make ``expires``
    longer than the 15 digits the Worker reads (``EXPIRES_PATTERN`` in worker/src/signing.ts),
    which answers 403 however valid the signature."""
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(BASE, target, secret=SECRET, ttl=ttl, now=1_800_000_000)
    assert info.value.fields == ["ttl"]


@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_take_the_longest_ttl_the_settings_take(build: Any) -> None:
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    ttl = Settings(signed_url_ttl=MAX_SIGNED_URL_TTL).signed_url_ttl
    url = build(BASE, target, secret=SECRET, ttl=ttl, now=1_800_000_000)
    expires = parse_qs(urlsplit(url).query)["expires"][0]
    assert re.fullmatch(r"\d{1,15}", expires) and int(expires) == 1_800_000_000 + ttl


@pytest.mark.parametrize("now", [-1, 10**15])
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_now_whose_expires_the_worker_cannot_read(
    build: Any, now: int
) -> None:
    """``expires=-59`` or 16 digits are not what the Worker reads (``EXPIRES_PATTERN``)."""
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(BASE, target, secret=SECRET, ttl=60, now=now)
    assert info.value.fields == ["now"]


@pytest.mark.parametrize(
    "secret", ["", "0123456789abcde", "0123456789abcdef\n", " 0123456789abcdef", "\ufeff" * 6]
)
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_secret_the_worker_would_not_sign_with(
    build: Any, secret: str
) -> None:
    """The Worker takes a ``SIGNING_SECRET`` of 16 bytes or more (worker/src/config.ts), and
    ``wrangler secret put`` trims whitespace from its end: the rule
    ``IMAGEGEN_URL_SIGNING_SECRET`` is held to."""
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(BASE, target, secret=secret, ttl=60, now=0)
    assert info.value.fields == ["secret"]
    with pytest.raises(ValidationError) as refused:
        Settings(url_signing_secret=SecretStr(secret))
    assert info.value.errors[0]["message"] in str(refused.value)


def test_url_builders_take_a_secret_of_16_bytes() -> None:
    url = public_url(BASE, "2026/05/01/abc.png", secret="é" * 8, ttl=60, now=0)
    signature = parse_qs(urlsplit(url).query)["signature"][0]
    assert verify("2026/05/01/abc.png", 60, signature, "é" * 8, now=0)


@pytest.mark.parametrize("now", [True, 1_000.0, 1_000.5])
@pytest.mark.parametrize("build", [public_url, gallery_url])
def test_url_builders_refuse_a_now_that_is_not_a_whole_number(build: Any, now: Any) -> None:
    target = "2026/05/01/abc.png" if build is public_url else "2026/05/01"
    with pytest.raises(InvalidRequest) as info:
        build(BASE, target, secret=SECRET, ttl=60, now=now)
    assert info.value.fields == ["now"]


def test_gallery_url() -> None:
    assert gallery_url(BASE) == f"{BASE}/"
    assert gallery_url(BASE + "/", "2026/05/01") == f"{BASE}/2026/05/01/"
    url = gallery_url(BASE, "2026/05/01/", secret=SECRET, ttl=60, now=0)
    query = parse_qs(urlsplit(url).query)
    assert verify("2026/05/01/", 60, query["signature"][0], SECRET, now=0)
    with pytest.raises(InvalidRequest) as info:
        gallery_url(BASE, "2026/5/1")
    assert info.value.fields == ["day"]


def test_public_url_refuses_bad_key() -> None:
    with pytest.raises(InvalidRequest) as info:
        public_url(BASE, "2026/05/01/abc.json")
    assert info.value.fields == ["key"]
    assert info.value.status == 400


def test_public_url_names_every_bad_argument() -> None:
    with pytest.raises(InvalidRequest) as info:
        public_url("/", "../etc/passwd", secret=SECRET, ttl=0)
    assert info.value.fields == ["base_url", "key", "ttl"]
    with pytest.raises(InvalidRequest) as info:
        public_url("https://img.example.com/x", "2026/05/01/abc.png", secret="s", ttl=10**16)
    assert info.value.fields == ["base_url", "secret", "ttl"]


# 5. The URLs persist publishes


async def test_the_published_urls_field_names_the_urls_persist_writes(tmp_path: Path) -> None:
    """``image.persisted``'s ``urls`` holds what persist writes, one URL per name the schema
    gives: derivatives have none of their own (their ``.png`` URL serves them by ``Accept``
    and ``w``)."""
    settings = Settings(storage_url=str(tmp_path / "out"), model="tiny", public_base_url=BASE)
    requested_at = datetime(2026, 5, 1, 12, tzinfo=UTC)
    async with ImageGenService(settings) as service:
        rendered = await store_rendered(
            service.storage, "described", requested_at, gradient_png(256, 256), "a kite"
        )
        persisted = await service.persist(rendered)
    schema = json.loads((SCHEMAS / "image.persisted.json").read_text())
    description = schema["properties"]["urls"]["description"]
    assert set(re.findall(r"`(\w+)`", description)) == set(persisted.urls)
    assert persisted.urls == {
        "image": public_url(BASE, persisted.keys["image"]),
        "thumbnail": public_url(BASE, persisted.keys["thumbnail"]),
    }


def test_the_python_examples_of_the_signed_url_docs_give_what_they_say() -> None:
    """Each expression of docs/signed-urls.md's Python blocks, run, against the reply written
    under it (``...`` standing for what it leaves out)."""
    import ast

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "signed-urls.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    checked = 0
    for block in blocks:
        lines = block.splitlines()
        scope: dict[str, Any] = {}
        for statement in ast.parse(block).body:
            assert statement.end_lineno is not None
            if not isinstance(statement, ast.Expr):
                exec(compile(ast.Module([statement], []), "signed-urls.md", "exec"), scope)
                continue
            value = eval(compile(ast.Expression(statement.value), "signed-urls.md", "eval"), scope)
            said = lines[statement.end_lineno] if statement.end_lineno < len(lines) else ""
            said = said.removeprefix("# ").strip()
            assert said.startswith("'"), (ast.unparse(statement), said)
            pattern = ".*".join(re.escape(part) for part in said.strip("'").split("..."))
            assert re.fullmatch(pattern, value), (value, said)
            checked += 1
    assert checked >= 3
