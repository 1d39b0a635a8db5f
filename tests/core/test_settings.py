from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from imagegen.auth.api_keys import ApiKeys, hash_api_key
from imagegen.errors import ConfigurationError, InvalidRequest
from imagegen.events import GENERATION_REQUESTED
from imagegen.settings import DEFAULT_MODEL, Settings
from tests.conftest import RunCli
from tests.functions.clients import InProcessFunction
from tests.functions.conftest import base_env
from tests.functions.servers import post_event


def test_defaults_are_a_laptop() -> None:
    settings = Settings()
    assert settings.profile == "dev"
    assert settings.model == DEFAULT_MODEL
    assert settings.storage_url == "./output"
    assert settings.device == "auto"
    assert settings.log_prompts is True


def test_prod_profile_changes_only_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_PROFILE", "prod")
    settings = Settings()
    assert (settings.device, settings.log_prompts) == ("cuda", False)
    monkeypatch.setenv("IMAGEGEN_LOG_PROMPTS", "true")
    assert Settings().log_prompts is True


def test_a_value_the_profile_set_is_said_as_the_profiles(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A user who never set IMAGEGEN_DEVICE is told it was the profile's: told to change
    IMAGEGEN_DEVICE alone, they looked for a variable they never set."""
    monkeypatch.setenv("IMAGEGEN_PROFILE", "prod")
    said = "IMAGEGEN_DEVICE=cuda (set by IMAGEGEN_PROFILE=prod)"
    assert Settings.given_as("device", Settings().device) == said
    assert Settings.given_as("model", "tiny") == "IMAGEGEN_MODEL=tiny"  # no profile's
    monkeypatch.setenv("IMAGEGEN_DEVICE", "cuda")  # set, to the profile's value all the same
    assert Settings.given_as("device", "cuda") == "IMAGEGEN_DEVICE=cuda"
    monkeypatch.delenv("IMAGEGEN_DEVICE")
    monkeypatch.delenv("IMAGEGEN_PROFILE")
    assert Settings.given_as("device", "cuda") == "IMAGEGEN_DEVICE=cuda"  # dev's is auto
    (tmp_path / ".env").write_text("IMAGEGEN_PROFILE=prod\n")  # read as the settings read it
    assert Settings.given_as("device", "cuda") == said


def test_environment_lists_and_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_OLLAMA_HOST")
    monkeypatch.setenv("OLLAMA_HOST", "http://ollama:11434")
    monkeypatch.setenv("IMAGEGEN_HOLIDAY_COUNTRIES", "US, DE")
    monkeypatch.setenv("IMAGEGEN_MODEL", "tiny")
    monkeypatch.setenv("IMAGEGEN_ALLOWED_MODELS", '["tiny"]')  # the former name still works
    monkeypatch.setenv("IMAGEGEN_PLUGIN_OPTIONS", '{"art_style": {"style": "ukiyo-e"}}')
    settings = Settings()
    assert settings.ollama_host == "http://ollama:11434"
    assert settings.holiday_countries == ["US", "DE"]
    assert settings.served_models == ["tiny"]
    assert settings.plugin_options == {"art_style": {"style": "ukiyo-e"}}


def test_prefixed_ollama_host_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "http://a:1")
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "http://b:2")
    assert Settings().ollama_host == "http://b:2"


def test_secrets_stay_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_S3_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("IMAGEGEN_URL_SIGNING_SECRET", "signing-secret-value")
    settings = Settings()
    assert "very-secret-value" not in repr(settings)
    assert "signing-secret-value" not in str(settings.model_dump())
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "very-secret-value"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("IMAGEGEN_MODEL=tiny\n")
    assert Settings().model == "tiny"


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


def test_the_default_model_is_flux2_klein_4b_pinned() -> None:
    settings = Settings()

    assert settings.model == "black-forest-labs/FLUX.2-klein-4B" == DEFAULT_MODEL
    assert settings.model in settings.served_models
    assert settings.revision_for(settings.model) == "e7b7dc27f91deacad38e78976d1f2b499d76a294"
    assert settings.revision_for("black-forest-labs/FLUX.1-schnell") is None  # not pinned
    assert settings.revision_for("tiny") is None


def test_revisions_are_pinned_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "IMAGEGEN_MODEL_REVISIONS",
        '{"black-forest-labs/FLUX.1-schnell": "abc123", "black-forest-labs/FLUX.2-klein-4B": "v2"}',
    )
    settings = Settings()

    assert settings.revision_for("black-forest-labs/FLUX.1-schnell") == "abc123"
    assert settings.revision_for("black-forest-labs/FLUX.2-klein-4B") == "v2"


def test_the_default_model_must_be_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", "tiny,tiny-klein")

    with pytest.raises(ValidationError, match=r"IMAGEGEN_MODEL must be one of"):
        Settings()
    assert Settings(model="tiny-klein").served_models == ["tiny", "tiny-klein"]


@pytest.mark.parametrize(
    "model",
    [
        "black-forest-labs/FLUX.2-klein-9B",
        "black-forest-labs/FLUX.1-dev",
        # The Hub resolves an id in any case: so does the licence.
        "black-forest-labs/flux.1-dev",
        "Black-Forest-Labs/FLUX.2-KLEIN-9B",
    ],
)
def test_non_commercial_models_need_the_operator_to_allow_them(
    monkeypatch: pytest.MonkeyPatch, model: str
) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL", model)
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", model)

    with pytest.raises(ValidationError, match=r"Non-Commercial License.*ALLOW_NON_COMMERCIAL"):
        Settings()
    monkeypatch.setenv("IMAGEGEN_ALLOW_NON_COMMERCIAL", "true")
    assert Settings().served_models == [model]


@pytest.mark.parametrize(
    ("model", "served", "said"),
    [
        ("black-forest-labs/FLUX.2-klein-4B", "tiny", "IMAGEGEN_MODEL must be one of"),
        ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev", "Non-Commercial"),
    ],
)
def test_the_served_models_are_named_by_the_variable_set(
    monkeypatch: pytest.MonkeyPatch, model: str, served: str, said: str
) -> None:
    """Set by its former name, the setting is named so: not IMAGEGEN_SERVED_MODELS, which the
    user never set."""
    monkeypatch.setenv("IMAGEGEN_MODEL", model)
    monkeypatch.setenv("IMAGEGEN_ALLOWED_MODELS", served)
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = str(caught.value)
    assert said in message and "IMAGEGEN_ALLOWED_MODELS" in message
    assert "IMAGEGEN_SERVED_MODELS" not in message


def test_the_served_models_are_said_by_their_variable_in_the_cli(cli: RunCli) -> None:
    result = cli("doctor", env={"IMAGEGEN_ALLOWED_MODELS": "tiny"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "imagegen: error: invalid settings: IMAGEGEN_MODEL must be one of"
        " IMAGEGEN_ALLOWED_MODELS (tiny)"
    )


KEY_HASH = hash_api_key("igk_first")
NO_HASH = "is not sha256:<64 hex digits>"


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("foo", f"entry 1 of 1 {NO_HASH}"),
        (f"{KEY_HASH},sha256:{'a' * 63}", f"entry 2 of 2 {NO_HASH}"),
        (f"{KEY_HASH},{KEY_HASH}x,{KEY_HASH}", f"entry 2 of 3 {NO_HASH}"),
        (f"sha256:{'g' * 64}", f"entry 1 of 1 {NO_HASH}"),
        (KEY_HASH.removeprefix("sha256:"), f"entry 1 of 1 {NO_HASH}"),
        (
            f"{KEY_HASH},igk_pasted_the_key",
            "entry 2 of 2 is an API key, not its hash: configure its sha256:<64 hex digits> hash",
        ),
    ],
    ids=["word", "short", "longer", "no-hex", "no-prefix", "the-key"],
)
def test_api_key_hashes_that_are_no_hashes_are_refused_naming_the_entry(
    monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    """Taken before, such an entry failed every function's start-up after it: each request
    answered 503 (retried without end), while doctor and the CLI said nothing was wrong."""
    monkeypatch.setenv("IMAGEGEN_API_KEY_HASHES", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == ("api_key_hashes",)
    assert error["msg"] == f"Value error, {said}"
    refused = ConfigurationError.of("", caught.value, name=Settings.variable)
    assert refused.message == "invalid settings: IMAGEGEN_API_KEY_HASHES"
    assert "igk_pasted" not in str(caught.value)  # named by its place, never echoed
    # The gate says it alike, to a caller that builds the key set itself.
    with pytest.raises(InvalidRequest) as gate:
        ApiKeys(value.split(","))
    assert gate.value.errors == [{"field": "api_key_hashes", "message": said}]


def test_api_key_hashes_are_taken_in_any_case_and_blank_entries_skipped() -> None:
    upper = "SHA256:" + KEY_HASH.removeprefix("sha256:").upper()
    settings = Settings(api_key_hashes=json.dumps([KEY_HASH, " ", upper]))
    assert ApiKeys(settings.api_key_hashes).match("igk_first") == KEY_HASH
    assert Settings(api_key_hashes="").api_key_hashes == []


def test_the_cli_refuses_api_key_hashes_that_are_no_hashes(cli: RunCli) -> None:
    result = cli("doctor", "--json", env={"IMAGEGEN_API_KEY_HASHES": "foo"})
    assert result.returncode == 2, result.stderr
    [row] = json.loads(result.stdout)["checks"]
    assert (row["check"], row["status"]) == ("settings", "error")
    assert row["summary"] == (
        f"invalid settings: IMAGEGEN_API_KEY_HASHES (entry 1 of 1 {NO_HASH})."
    )


WAITS = ["ollama_timeout", "ollama_breaker_cooldown", "remote_context_timeout"]
WAITS += ["webhook_timeout", "oidc_jwks_ttl", "render_timeout"]


@pytest.mark.parametrize("field", WAITS)
@pytest.mark.parametrize("seconds", [float("inf"), float("nan"), 1e300])
def test_a_wait_no_clock_can_keep_is_refused(field: str, seconds: float) -> None:
    # Each ends in a timeout handed to threading or asyncio, which overflow past TIMEOUT_MAX.
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: seconds})  # type: ignore[arg-type]
    assert [e["loc"][0] for e in caught.value.errors()] == [field]
    assert Settings(**{field: 86_400.0}).model_dump()[field] == 86_400.0  # a day is allowed


@pytest.mark.parametrize(
    ("base", "found"),
    [
        ("https://img.example.com/images", "a path"),
        ("https://img.example.com/images/", "a path"),
        ("https://img.example.com//", "a path"),
        ("https://img.example.com/?v=1", "a query"),
        ("https://img.example.com?", "a query"),  # an empty query breaks the URLs all the same
        ("https://img.example.com/#top", "a fragment"),
        ("https://img.example.com#", "a fragment"),
        ("https://img.example.com/i?v=1#top", "a path, a query and a fragment"),
    ],
)
def test_a_public_base_url_with_anything_after_its_host_is_refused(base: str, found: str) -> None:
    """The Worker reads an object's key from the whole path (worker/src/keys.ts) and persist
    writes ``<base>/<key>`` into records written once: a base with a path, a query or a
    fragment broke every public URL for good, and was taken."""
    with pytest.raises(ValidationError) as caught:
        Settings(public_base_url=base)
    [error] = caught.value.errors()
    assert error["loc"] == ("public_base_url",)
    assert f"has {found}: the Worker serves keys at the root of its host" in error["msg"]
    assert base not in str(caught.value)  # said, never echoed (a URL may carry credentials)


@pytest.mark.parametrize(
    "base",
    [
        "https://alice:s3cr3t@img.example.com",
        "https://alice@img.example.com/",
        "https://:s3cr3t@img.example.com:8443",
        "https://@img.example.com",
    ],
)
def test_a_public_base_url_with_credentials_is_refused(base: str) -> None:
    """persist writes ``<base>/<key>`` into every record and event: a user name or password
    in the base was taken, and handed to everyone given a URL."""
    with pytest.raises(ValidationError) as caught:
        Settings(public_base_url=base)
    [error] = caught.value.errors()
    assert error["loc"] == ("public_base_url",)
    assert "has a user name or password" in error["msg"]
    assert "s3cr3t" not in str(caught.value) and "alice" not in str(caught.value)


def test_credentials_and_a_path_in_a_public_base_url_are_both_named() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(public_base_url="https://alice:s3cr3t@img.example.com/images")
    [error] = caught.value.errors()
    assert "has a user name or password" in error["msg"]
    assert "has a path: the Worker serves keys at the root of its host" in error["msg"]


@pytest.mark.parametrize(
    "base", ["https://img.example.com", "https://img.example.com/", "http://127.0.0.1:8787/"]
)
def test_a_public_base_url_that_is_an_origin_is_taken_as_given(base: str) -> None:
    assert Settings(public_base_url=base).public_base_url == base


_SPACED = "begins or ends with whitespace (a newline from a file, a stray space)"
_CONTROL = "has a control character in it (a tab, a newline)"


@pytest.mark.parametrize(
    ("base", "said"),
    [
        (" https://img.example.com", _SPACED),  # urlsplit drops it; the record keeps it
        ("https://img.example.com ", _SPACED),
        # A file that ends in a newline (kubectl create secret/configmap --from-file keeps it).
        ("https://img.example.com\n", _SPACED),
        ("\thttps://img.example.com", _SPACED),
        ("https://img.example.com/\r\n", _SPACED),
        ("https://img.exa\tmple.com", _CONTROL),  # urlsplit drops every tab and newline
        ("https://img.example.com\x7f", _CONTROL),
        ("https://img.example.com\x00", _CONTROL),
        ("https://img. example.com", "has whitespace in it, which no origin has"),
        ("HTTPS://img.example.com", "is not the URL it reads as"),
    ],
)
def test_a_public_base_url_urllib_reads_otherwise_is_refused(base: str, said: str) -> None:
    """``urlsplit`` drops whitespace before a URL and every tab and newline in it, so such a
    base was taken, and written into every record's URL for good (``https://host\\n/2026/..``)."""
    with pytest.raises(ValidationError) as caught:
        Settings(public_base_url=base)
    [error] = caught.value.errors()
    assert error["loc"] == ("public_base_url",)
    assert error["msg"].startswith(f"Value error, {said}"), error["msg"]
    assert "img" not in str(caught.value)  # said, never echoed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sink_url", "http://broker-ingress.example/imagegen/default\n"),
        ("s3_endpoint_url", " https://storage.example.com"),
        ("oidc_discovery_url", "https://kubernetes.default.svc\n"),
        ("ledger_url", "https://ledger.example.com "),
        ("ledger_url", "postgresql://pg:s3cr3t@db:5432/imagegen\n"),
        ("ollama_host", "http://ollama:11434\n"),
        ("ollama_host", "ollama:11434 "),  # the client would look up the host "ollama "
    ],
)
def test_every_url_setting_refuses_whitespace_around_it(field: str, value: str) -> None:
    """The clients were given the text with its newline or space, which urllib drops in part
    (a trailing space stays in the host), or a database name ends in."""
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})  # type: ignore[arg-type]
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and error["msg"] == f"Value error, {_SPACED}"
    assert value.strip() not in str(caught.value)  # never echoed (a URL may carry credentials)
    assert Settings(**{field: value.strip()}).model_dump()[field] is not None


@pytest.mark.parametrize(
    ("base", "said"),
    [
        # Browsers, and the Worker's new URL, read "\\" as "/": the path was "//2026/...".
        ("https://img.example.com\\", "has a backslash in it, which browsers read as /"),
        ("https://img.example.com\\x", "has a backslash in it"),
        ("https://img.example.com%2F", "has a percent sign in its host"),
        ("https://img.example.com^", "has a host that is no DNS name"),
        ("https://img.example.com|x", "has a host that is no DNS name"),
        ("https://img.example.com<", "has a host that is no DNS name"),
        ('https://a"b.com', "has a host that is no DNS name"),
        ("https://img..example.com", "has a host that is no DNS name"),
        ("https://img.example.com..", "has a host that is no DNS name"),
        ("https://img.example.com:0", "has port 0, at which no server is reached"),
        ("https://b\u00fccher.example", "has a host that is not ASCII: give its IDNA form"),
        ("https://xn--a.example", "has an xn-- label in its host that is not valid IDNA"),
        ("https://img.example.123", "has a host that ends in a number but is no IPv4"),
        ("https://1.2.3.256", "has a host that ends in a number but is no IPv4"),
        ("https://[fe80::1%25eth0]", "has an IPv6 address with a zone"),
    ],
)
def test_a_public_base_url_browsers_read_otherwise_or_refuse_is_refused(
    base: str, said: str
) -> None:
    """urllib took each, and every URL persist wrote from it, kept for good, was one browsers
    and the Worker read as another URL (a path "//2026/...") or refused, or one at no server
    (tests/test_public_base_url_whatwg.py checks the rule against Node's parser)."""
    with pytest.raises(ValidationError) as caught:
        Settings(public_base_url=base)
    [error] = caught.value.errors()
    assert error["loc"] == ("public_base_url",)
    assert error["msg"].startswith(f"Value error, {said}"), error["msg"]
    assert error["msg"].endswith("give it as https://host[:port]") or "backslash" in said


@pytest.mark.parametrize(
    "base",
    [
        "https://xn--bcher-kva.example",
        "https://[2001:db8::1]:8443/",
        "http://10.0.0.7:8787",
        "https://images.example.com.",
        "http://localhost.",
        "https://img_cdn.example.com",
    ],
)
def test_a_public_base_url_browsers_write_as_it_is_is_taken(base: str) -> None:
    assert Settings(public_base_url=base).public_base_url == base


@pytest.mark.parametrize(
    ("base", "written"),
    [
        ("https://Images.example.com", "https://images.example.com"),
        ("https://images.example.com:443", "https://images.example.com"),
        ("http://images.example.com:80/", "http://images.example.com/"),
        ("https://images.example.com:08443", "https://images.example.com:8443"),
        ("https://images.example.com:", "https://images.example.com"),
        ("https://[2001:DB8::1]", "https://[2001:db8::1]"),
        ("http://[0:0::1]:8787", "http://[::1]:8787"),
        ("http://[::ffff:127.0.0.1]:8787", "http://[::ffff:7f00:1]:8787"),
        ("http://127.1:8787", "http://127.0.0.1:8787"),
    ],
)
def test_a_public_base_url_browsers_rewrite_is_taken_as_they_write_it(
    base: str, written: str
) -> None:
    """Refused before, which stopped every function at start-up: browsers, and the Worker's
    new URL, read each as another text of the same origin. Each public URL is written from
    that text, so records hold the URL browsers request."""
    assert Settings(public_base_url=base).public_base_url == written
    assert Settings(public_base_url=written).public_base_url == written


def test_a_public_base_url_with_a_backslash_names_its_variable(cli: RunCli) -> None:
    result = cli("plugins", env={"IMAGEGEN_PUBLIC_BASE_URL": "https://img.example.com\\"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "imagegen: error: invalid settings: IMAGEGEN_PUBLIC_BASE_URL (has a backslash in it,"
        " which browsers read as /: give https://host[:port])"
    )


def test_a_public_base_url_with_a_newline_names_its_variable(cli: RunCli) -> None:
    result = cli("plugins", env={"IMAGEGEN_PUBLIC_BASE_URL": "https://img.example.com\n"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"imagegen: error: invalid settings: IMAGEGEN_PUBLIC_BASE_URL ({_SPACED})"
    )


def test_only_the_public_base_url_must_be_an_origin() -> None:
    """The other URLs may need their paths: a broker's ingress has one (K_SINK), an S3
    endpoint or Ollama behind a proxy may."""
    paths = {
        "sink_url": "http://broker-ingress.knative-eventing.svc.cluster.local/imagegen/default",
        "s3_endpoint_url": "https://storage.example.com/s3",
        "ollama_host": "http://proxy.example.com/ollama",
    }
    settings = Settings(**paths)  # type: ignore[arg-type]
    assert settings.model_dump(include=set(paths)) == paths


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("ollama_host", "http://[::1/", "its IPv6 host is not enclosed in [ and ]"),
        ("sink_url", "http://::1]:8080/", "its IPv6 host is not enclosed in [ and ]"),
        ("sink_url", "http://broker:99999/", "its port is out of range"),
        ("s3_endpoint_url", "http://user:s3cret-pass/", "its port is not a number"),
    ],
)
def test_a_url_that_cannot_be_split_is_said_for_what_it_is(
    field: str, value: str, said: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{field: value})  # type: ignore[arg-type]
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and said in error["msg"]
    assert value not in str(caught.value)  # never echoed (a URL may carry credentials)


# -- an empty Ollama host ---------------------------------------------------------------------

NO_OLLAMA = "http://127.0.0.1:47100"  # nothing listens there


def test_an_empty_ollama_host_is_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Read as Ollama reads an empty OLLAMA_HOST (ollama-python's ``_parse_host``): unset. An
    empty IMAGEGEN_OLLAMA_HOST hid OLLAMA_HOST, and the client then read that itself, unchecked."""
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "")
    monkeypatch.setenv("OLLAMA_HOST", "http://a:1")
    assert Settings().ollama_host == "http://a:1"
    monkeypatch.setenv("OLLAMA_HOST", "")
    assert Settings().ollama_host == "http://127.0.0.1:11434"
    monkeypatch.delenv("IMAGEGEN_OLLAMA_HOST")
    assert Settings().ollama_host == "http://127.0.0.1:11434"
    # An empty variable gives way to the .env file as an unset one does.
    monkeypatch.setenv("IMAGEGEN_OLLAMA_HOST", "")
    (tmp_path / ".env").write_text("IMAGEGEN_OLLAMA_HOST=\nOLLAMA_HOST=http://c:3\n")
    assert Settings().ollama_host == "http://c:3"


def test_an_empty_ollama_host_given_as_an_argument_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(ollama_host="")
    [error] = caught.value.errors()
    assert error["loc"] == ("ollama_host",) and "empty" in error["msg"]


@pytest.mark.parametrize("command", [["doctor"], ["generate", "x", "--model", "tiny"]])
def test_an_empty_ollama_host_does_not_let_a_bad_ollama_host_through(
    cli: RunCli, command: list[str]
) -> None:
    """It reached the Ollama client unchecked: an internal error (ValueError), exit 1."""
    env = {"IMAGEGEN_OLLAMA_HOST": "", "OLLAMA_HOST": "localhost:99999"}
    result = cli(*command, env=env)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "imagegen: error: invalid settings: OLLAMA_HOST (not a valid URL or host[:port]"
        " (its port is out of range))"
    )


def test_doctor_names_the_ollama_host_an_empty_variable_gave_way_to(cli: RunCli) -> None:
    result = cli("doctor", "--json", env={"IMAGEGEN_OLLAMA_HOST": "", "OLLAMA_HOST": NO_OLLAMA})
    [ollama] = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "ollama"]
    assert ollama["summary"] == f"Ollama is not running at {NO_OLLAMA}."


def test_the_enhance_function_answers_503_naming_the_ollama_host_set(tmp_path: Path) -> None:
    """The Ollama client, given an empty host, read the bad one itself: enhance fell back to
    its template for every request, and said nothing of the setting."""
    env = {**base_env(tmp_path / "store"), "IMAGEGEN_OLLAMA_HOST": "", "OLLAMA_HOST": ":99999"}
    with InProcessFunction("enhance", env) as enhance:
        assert enhance.get("/readyz").status_code == 503
        reply = post_event(enhance, GENERATION_REQUESTED, {"prompt": "a fox"}, subject="host-1")
    assert reply.status_code == 503, reply.text
    body = reply.json()
    assert body["error"] == "not_configured"
    assert body["message"] == "enhance could not start: invalid settings: OLLAMA_HOST"
    why = "not a valid URL or host[:port] (its port is out of range)"
    assert body["errors"] == [{"field": "OLLAMA_HOST", "message": why}]


# -- settings that were taken as given and failed later -----------------------------------------


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "not an http:// or https:// URL with a host"),
        ("", "empty: give an http:// or https:// URL, or leave it unset"),
        ("ftp://issuer.example.com", "not an http:// or https:// URL with a host"),
        ("https://alice:s3cr3t@issuer:99999", "its port is out of range"),
    ],
)
def test_an_oidc_discovery_url_that_is_no_http_url_is_refused(url: str, said: str) -> None:
    """It was taken as any text: the function said it was ready and answered every request
    that needed OIDC 503."""
    with pytest.raises(ValidationError) as caught:
        Settings(oidc_discovery_url=url)
    [error] = caught.value.errors()
    assert error["loc"] == ("oidc_discovery_url",) and said in error["msg"]
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("postgresql://pg:s3cr3t@127.0.0.1:abc/db", "its port is not a number"),
        ("postgres://pg:s3cr3t@127.0.0.1:99999/db", "its port is out of range"),
        ("postgresql://pg:s3cr3t@db:0/db", "its port is out of range"),
        ("postgresql://pg:s3cr3t@db-1:5432,db-2:x/db", "its port is not a number"),
        ("postgresql://pg:s3cr3t@[::1:5432/db", "its IPv6 host is not enclosed in [ and ]"),
        ("postgresql:///db?host=/run/postgresql&port=s3cr3t", "its port is not a number"),
    ],
)
def test_a_postgresql_ledger_url_whose_port_libpq_refuses_is_refused(url: str, said: str) -> None:
    """It was taken: the ledger said it was ready and answered every request 503, and the
    command line waited ten seconds to call the database unreachable."""
    with pytest.raises(ValidationError) as caught:
        Settings(ledger_url=url)
    [error] = caught.value.errors()
    assert error["loc"] == ("ledger_url",)
    assert error["msg"] == f"Value error, not a valid PostgreSQL URL ({said})"
    assert "s3cr3t" not in str(caught.value)  # the URL holds a password: never echoed


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://pg:pw@db:5432/imagegen",
        "postgresql://pg:pw@db/imagegen",  # the default port
        "postgresql://pg:pw@db-1:5432,db-2:5433/imagegen",  # libpq's several hosts
        "postgresql://pg:pw@[::1]:5432/imagegen",
        "postgresql:///imagegen?host=/run/postgresql&port=5433",
        "postgresql://pg:pw@db:%35432/imagegen",  # percent-encoded, as libpq decodes it
        # libpq ends the credentials at the first "@" before any "/": a password may hold
        # what ends a web URL's authority or brackets an IPv6 host
        "postgresql://pg:p?x#y]z@db:5432/imagegen",
        "postgresql://pg:p[w@db/imagegen",
        "postgresql://pg:p]w@[::1]:5432/imagegen",
    ],
)
def test_a_postgresql_ledger_url_libpq_reads_is_taken(url: str) -> None:
    settings = Settings(ledger_url=url)
    assert settings.ledger_url is not None and settings.ledger_url.get_secret_value() == url


@pytest.mark.parametrize("host", ["[],", "db:1,"])
def test_a_postgresql_ledger_url_of_many_hosts_is_checked_in_linear_time(host: str) -> None:
    """Each host is read once from where the last one ended: a URL of a million characters
    in a fraction of a second (copying what was left of it after each host took seconds, four
    times as long for twice the hosts)."""
    import time

    url = "postgresql://" + host * (1_000_000 // len(host)) + "/db?port=5432"
    started = time.monotonic()
    settings = Settings(ledger_url=url)
    assert settings.ledger_url is not None and settings.ledger_url.get_secret_value() == url
    assert time.monotonic() - started < 3  # about half a second; a copy a host, over ten


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        (
            "IMAGEGEN_DERIVATIVE_WIDTHS",
            "256,hunter2",
            ["entry 2 of 2: Input should be a valid integer, unable to parse string as an integer"],
        ),
        (
            "IMAGEGEN_DERIVATIVE_WIDTHS",
            "8193,512,8",
            [
                "entry 1 of 3: Input should be less than or equal to 8192",
                "entry 3 of 3: Input should be greater than or equal to 16",
            ],
        ),
        ("IMAGEGEN_SERVED_MODELS", '["tiny", 1]', ["entry 2 of 2: Input should be a valid string"]),
        ("IMAGEGEN_LORAS", '[["hunter2"]]', ["entry 1 of 1: Input should be a valid string"]),
        (
            "IMAGEGEN_WEBHOOK_ALLOWED",
            '["10.0.0.0/8", "db", null]',
            ["entry 3 of 3: Input should be a valid string"],
        ),
        (
            "IMAGEGEN_API_KEY_HASHES",
            '[{"hunter2": 1}]',
            ["entry 1 of 1: Input should be a valid string"],
        ),
    ],
)
def test_an_entry_of_a_list_pydantic_refuses_is_named_by_its_place(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: list[str]
) -> None:
    """As the settings' own checks name one (``entry 2 of 3``): pydantic's own named it by its
    index from 0 (``derivative_widths.1``)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    errors = caught.value.errors()
    assert [e["msg"] for e in errors] == said
    assert all(Settings.variable(str(e["loc"][0])) == variable for e in errors)
    assert all(len(e["loc"]) == 1 for e in errors)  # no index after the setting's name
    assert "hunter2" not in str(caught.value)


_PADDED = (
    "begins or ends with whitespace: the Worker's copy, set with wrangler secret put, loses"
    " trailing whitespace and would sign differently"
)


@pytest.mark.parametrize(
    ("secret", "said"),
    [
        ("", "empty: give a random secret (openssl rand -hex 32), or leave it unset"),
        ("s3cr3t-15-bytes", "shorter than 16 bytes: use openssl rand -hex 32"),
        # A file that ends in a newline (kubectl create secret --from-file keeps it).
        ("0123456789abcdef" * 4 + "\n", _PADDED),
        (" 0123456789abcdef", _PADDED),
        # A byte order mark, as some editors write: JavaScript's trim() drops it, str.strip() not.
        ("\ufeff0123456789abcdef", _PADDED),
        (" " * 16, _PADDED),
    ],
)
def test_an_empty_short_or_padded_url_signing_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, secret: str, said: str
) -> None:
    """``bool(SecretStr(""))`` is False: an empty secret (a failed ``$(openssl rand -hex 32)``)
    gave unsigned URLs, written once into every record, without a word. One with whitespace
    around it signed every URL with a secret the Worker does not have: all answered 403."""
    monkeypatch.setenv("IMAGEGEN_URL_SIGNING_SECRET", secret)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == ("url_signing_secret",) and error["msg"] == f"Value error, {said}"
    if secret.strip():
        assert secret.strip() not in str(caught.value)
    monkeypatch.setenv("IMAGEGEN_URL_SIGNING_SECRET", "0123456789abcdef")  # 16 bytes
    assert Settings().url_signing_secret is not None


FINITE = ["render_batch_window_ms", "ollama_temperature", "lora_probability", "oidc_clock_skew"]


@pytest.mark.parametrize("field", FINITE)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_setting_refuses_what_is_no_finite_number_as_such(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str
) -> None:
    """As a wait does: nan was said to be "less than or equal to" its bound."""
    monkeypatch.setenv(f"IMAGEGEN_{field.upper()}", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == (field,) and error["msg"] == "Input should be a finite number"


@pytest.mark.parametrize("value", ["30m", "24h", "1h30m", "300", "-1", "2.5s", "+5m", ".5h"])
def test_a_keep_alive_ollama_reads_is_taken(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IMAGEGEN_OLLAMA_KEEP_ALIVE", value)
    assert Settings().ollama_keep_alive == value


@pytest.mark.parametrize("value", ["", "forever", "5 m", "1d", "m", "30m\n"])
def test_a_keep_alive_ollama_cannot_read_is_said_in_words(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """It quoted the regular expression it failed."""
    monkeypatch.setenv("IMAGEGEN_OLLAMA_KEEP_ALIVE", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == ("ollama_keep_alive",)
    assert error["msg"] == (
        "Value error, not a duration: give one such as 30m or 24h, seconds, or -1 for always"
    )


@pytest.mark.parametrize("value", ["", " , ", "[]"])
def test_no_served_models_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """It was said as "IMAGEGEN_MODEL must be one of IMAGEGEN_SERVED_MODELS ()"."""
    monkeypatch.setenv("IMAGEGEN_SERVED_MODELS", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == ("IMAGEGEN_SERVED_MODELS",)  # pydantic names an alias's first
    assert error["msg"] == "Value error, empty: name the models the render services serve"


NO_HOME = "~ names no home directory this process can find"


@pytest.mark.parametrize(
    ("model", "served", "said"),
    [
        ("tiny", "tiny,~nosuchuser/pipeline", f"IMAGEGEN_SERVED_MODELS (entry 2 of 2: {NO_HOME})"),
        (
            "~nosuchuser/pipeline",
            "~nosuchuser/pipeline",
            f"IMAGEGEN_MODEL, IMAGEGEN_SERVED_MODELS (IMAGEGEN_MODEL: {NO_HOME};"
            f" IMAGEGEN_SERVED_MODELS: entry 1 of 1: {NO_HOME})",
        ),
    ],
)
@pytest.mark.parametrize("command", [["models", "list"], ["doctor"], ["models", "pull"]])
def test_a_model_whose_home_cannot_be_found_is_refused_naming_its_variable(
    cli: RunCli, model: str, served: str, said: str, command: list[str]
) -> None:
    """``~user`` of no such user (or ``~`` with no passwd entry and no ``HOME``, as in many
    containers) expands to nothing: pathlib's RuntimeError ended each command in a
    traceback, and render expands the name at every job."""
    result = cli(*command, env={"IMAGEGEN_MODEL": model, "IMAGEGEN_SERVED_MODELS": served})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"imagegen: error: invalid settings: {said}"


FP8_COMPILED = "IMAGEGEN_RENDER_FP8=true with IMAGEGEN_RENDER_COMPILE="


@pytest.mark.parametrize(
    ("fp8", "compile_", "warned"),
    [
        ("true", "regional", True),
        ("true", "full", True),
        ("true", "off", False),
        ("false", "regional", False),
    ],
)
def test_fp8_with_compile_is_warned_of_at_start_up(
    monkeypatch: pytest.MonkeyPatch, fp8: str, compile_: str, warned: bool
) -> None:
    """Its first render had not finished after 370 s when measured (docs/benchmarks.md): with
    the warm-up, a render pod would never become ready. Warned of, not refused."""
    monkeypatch.setenv("IMAGEGEN_RENDER_FP8", fp8)
    monkeypatch.setenv("IMAGEGEN_RENDER_COMPILE", compile_)
    said = [w for w in Settings().start_up_warnings() if w.startswith(FP8_COMPILED)]
    assert len(said) == warned
    if warned:
        assert said[0].startswith(f"{FP8_COMPILED}{compile_}: ")
        assert "had not finished after 370 s" in said[0]
        assert "torch 2.11, torchao 0.17" in said[0] and "IMAGEGEN_RENDER_WARMUP" in said[0]


# -- IMAGEGEN_AUTH_SUBJECTS ----------------------------------------------------------------------

BROKER = "system:serviceaccount:imagegen:oidc-broker-ingress"
TRIGGER = "system:serviceaccount:imagegen:imagegen-ledger-oidc.trigger"


@pytest.mark.parametrize("value", ["", " ", " , ", "\n", "[]", " [ ] "])
def test_auth_subjects_that_name_none_are_refused_not_taken_for_any(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """An empty list admits any subject: a command that printed nothing turned the narrowing
    off, every token for the function's audience admitted, without a word."""
    monkeypatch.setenv("IMAGEGEN_AUTH_SUBJECTS", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    reason = ConfigurationError.of("", caught.value, name=Settings.variable).message
    assert reason == "invalid settings: IMAGEGEN_AUTH_SUBJECTS"
    [error] = caught.value.errors()
    assert error["loc"] == ("auth_subjects",)
    assert error["msg"] == (
        "Value error, empty: give the subjects to admit (system:serviceaccount:<namespace>:"
        "<name>), or leave it unset to admit any"
    )
    monkeypatch.delenv("IMAGEGEN_AUTH_SUBJECTS")
    assert Settings().auth_subjects == []  # unset: any subject, as documented


@pytest.mark.parametrize(
    "value",
    [
        # What the kubectl command of docs/authentication.md prints: one a line.
        f"{BROKER}\n{TRIGGER}\n",
        f"{BROKER}\r\n{TRIGGER}\r\n",
        f"{BROKER},{TRIGGER}",
        f" {BROKER} ,\n {TRIGGER} ",
        json.dumps([BROKER, TRIGGER]),
    ],
)
def test_auth_subjects_one_a_line_or_comma_separated_are_each_taken(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """One a line was taken for one subject with newlines in it, which no token has: the
    broker itself was refused 403, which Knative does not retry."""
    monkeypatch.setenv("IMAGEGEN_AUTH_SUBJECTS", value)
    assert Settings().auth_subjects == [BROKER, TRIGGER]


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        # kubectl's {.items[*]...} without a range: subjects separated by spaces.
        (f"{BROKER} {TRIGGER}", "has whitespace in it: separate subjects with commas or newlines"),
        (f"{TRIGGER}\t", "has whitespace in it"),  # kept as given in a JSON list
        # A Trigger whose status names no service account yet (authentication-oidc off).
        ("system:serviceaccount:imagegen:", "is not a service account's subject"),
        ("system:serviceaccount:imagegen:*", "is not a service account's subject"),  # no pattern
        ("system:serviceaccount:Imagegen:oidc-broker-ingress", "is not a service account's"),
        ("system:serviceaccount:imagegen:a:b", "is not a service account's subject"),
        ("system:serviceaccount:" + "n" * 64 + ":broker", "is not a service account's subject"),
        ("system:serviceaccount:imagegen:" + "b" * 254, "is not a service account's subject"),
    ],
)
def test_an_auth_subject_with_whitespace_or_of_no_service_account_is_refused(
    entry: str, said: str
) -> None:
    """Such an entry matches no token the API server issues: the function it narrows refused
    every delivery 403 (each dead-lettered), and said so only then."""
    with pytest.raises(ValidationError) as caught:
        Settings(auth_subjects=json.dumps([BROKER, entry]))
    reason = ConfigurationError.of("", caught.value, name=Settings.variable).message
    assert reason == "invalid settings: IMAGEGEN_AUTH_SUBJECTS"
    [error] = caught.value.errors()
    assert error["loc"] == ("auth_subjects",)
    assert error["msg"].startswith(f"Value error, entry 2 of 2 {said}")
    assert entry not in str(caught.value)  # named by its place, as every entry refused is


def test_auth_subjects_of_the_longest_service_account_names_are_taken() -> None:
    longest = "system:serviceaccount:" + "n" * 63 + ":" + ".".join(["b" * 63] * 4)[:253]
    assert Settings(auth_subjects=f"{BROKER}\n{longest}").auth_subjects == [BROKER, longest]


def test_auth_subjects_of_another_issuer_are_taken_as_given() -> None:
    # An issuer other than the API server names its callers its own way.
    subjects = Settings(auth_subjects="108812345678901234567\nci@example.com").auth_subjects
    assert subjects == ["108812345678901234567", "ci@example.com"]


def test_a_keyword_that_is_no_setting_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``Settings(modle="tiny")`` ignored the misspelt keyword and loaded the default model (a
    download of gigabytes); a variable that is no setting is still only warned of."""
    with pytest.raises(ValidationError) as caught:
        Settings(modle="tiny", storage_url="./out", hf_tokn="hf_secret")
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [
        (("modle",), "extra_forbidden"),
        (("hf_tokn",), "extra_forbidden"),
    ]
    assert "hf_secret" not in str(caught.value)  # as every refusal, it never quotes a value
    reason = ConfigurationError.of("", caught.value, name=Settings.variable).message
    assert reason == "invalid settings: modle, hf_tokn"
    # Names and aliases of settings, in any case, are taken as before.
    given = Settings(MODEL="tiny", IMAGEGEN_ALLOWED_MODELS="tiny", ollama_host="http://a:1")
    assert (given.model, given.served_models, given.ollama_host) == ("tiny", ["tiny"], "http://a:1")
    # The environment and the .env file: a variable no setting reads is ignored, as before.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("IMAGEGEN_MODLE=tiny\nOTHER=1\n", encoding="utf-8")
    monkeypatch.setenv("IMAGEGEN_RENDER_QUEUE_SIZ", "4")
    assert Settings().model == DEFAULT_MODEL
    assert Settings.unknown_variables() == [
        "IMAGEGEN_MODLE is no setting (ignored); did you mean IMAGEGEN_MODEL?",
        "IMAGEGEN_RENDER_QUEUE_SIZ is no setting (ignored); did you mean "
        "IMAGEGEN_RENDER_QUEUE_SIZE?",
    ]
