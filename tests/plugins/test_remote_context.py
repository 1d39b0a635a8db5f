"""remote_context: JSON objects only, bounded in time and size; failures add nothing."""

from __future__ import annotations

import asyncio
import logging
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from imagegen._http import AiohttpTransport
from imagegen.errors import ConfigurationError
from imagegen.models import Contribution
from imagegen.plugins import PluginContext, PluginSet
from imagegen.settings import Settings
from imagegen_plugins.remote_context import RemoteContextPlugin
from tests.plugins.conftest import NOW, JsonEndpoint, gzip_bomb


def _settings(url: str | None, *, timeout: float = 4.0) -> Settings:
    """Settings for ``url``; ``timeout`` short only where the endpoint is made to hang (and
    below the plugins' time limit, as a plugin set refuses it otherwise)."""
    return Settings(
        remote_context_url=url,
        remote_context_timeout=timeout,
        remote_context_max_bytes=4096,
    )


async def _fetch(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, **options: object
) -> Contribution | None:
    context = PluginContext(
        "g", None, NOW, "UTC", 1, settings, options=options, plugin="remote_context"
    )
    plugin = RemoteContextPlugin(settings, transport=transport)
    try:
        return await plugin.contribute(context)
    finally:
        await plugin.aclose()


@pytest.fixture
async def plugin_set() -> AsyncIterator[Callable[[Settings], PluginSet]]:
    """``plugin_set(settings)``: remote_context alone in a plugin set; each closed as the test
    ends, as enhance closes its own (the plugin's client and its connections)."""
    made: list[PluginSet] = []

    def make(settings: Settings) -> PluginSet:
        made.append(PluginSet([RemoteContextPlugin(settings)], settings=settings))
        return made[-1]

    yield make
    for plugins in made:
        await plugins.aclose()


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The plugin's records only: an exporter thread left by another test may log meanwhile."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("imagegen.plugins")]


async def test_string_values_become_context(endpoint: JsonEndpoint) -> None:
    result = await _fetch(_settings(endpoint.at("/context")))
    assert result is not None
    assert result.data == {"values": {"weather": "light rain and mist", "mood": "calm"}}
    assert result.text == "light rain and mist, calm"


async def test_a_value_that_is_no_utf8_text_is_left_out_the_others_kept(
    endpoint: JsonEndpoint,
    caplog: pytest.LogCaptureFixture,
    plugin_set: Callable[[Settings], PluginSet],
) -> None:
    """No event carries a lone surrogate: the whole reply was refused as the plugin's crash."""
    settings = _settings(endpoint.at("/surrogate")).model_copy(update={"plugins": []})
    plugins = plugin_set(settings)
    with caplog.at_level(logging.WARNING):
        [result] = await plugins.run(generation_id="g", seed=1, now=NOW)
    assert result.data == {"values": {"mood": "calm"}} and result.text == "calm"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("not UTF-8 text; left out" in line for line in said), said
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def test_the_operator_url_option_wins(endpoint: JsonEndpoint) -> None:
    settings = _settings(endpoint.at("/text")).model_copy(
        update={"plugin_options": {"remote_context": {"url": endpoint.at("/context")}}}
    )
    result = await _fetch(settings)
    assert result is not None and result.data["values"]["mood"] == "calm"


async def test_a_request_cannot_choose_the_url(endpoint: JsonEndpoint) -> None:
    # A caller-chosen URL would let anyone make the service fetch internal addresses.
    result = await _fetch(_settings(endpoint.at("/context")), url="http://169.254.169.254/latest")
    assert result is not None and result.data["values"]["mood"] == "calm"
    assert await _fetch(_settings(None), url=endpoint.at("/context")) is None


async def test_the_operators_bad_url_is_the_operators_fault_whatever_the_request_gives(
    endpoint: JsonEndpoint, plugin_set: Callable[[Settings], PluginSet]
) -> None:
    """The plugin reads the operator's url alone: a request's is ignored, so a bad one is
    never the request's fault (a 400 that drops the event), but the setting's (a 503): where
    the plugin set is made from the settings, and at each request of a set made otherwise."""
    settings = _settings(None).model_copy(
        update={
            "plugins": ["remote_context"],
            "plugin_options": {"remote_context": {"url": "ftp://internal"}},
        }
    )
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(settings)
    assert refused.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]
    plugins = plugin_set(settings)
    for options in ({}, {"remote_context": {"url": endpoint.at("/context")}}):
        with pytest.raises(ConfigurationError) as caught:
            await plugins.run(generation_id="g", seed=1, now=NOW, options=options)
        assert caught.value.status == 503
        assert caught.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]


async def test_no_url_no_request() -> None:
    assert await _fetch(_settings(None)) is None


@pytest.mark.parametrize(
    "path",
    [
        "/big",
        "/big-unannounced",
        "/text",
        "/list",
        "/error",
        "/empty",
        "/deep",
        "/gzip-bomb",
        "/gzip-cut",
        "/brotli",
    ],
)
async def test_unusable_answers_are_skipped(
    endpoint: JsonEndpoint, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await _fetch(_settings(endpoint.at(path))) is None
    if path != "/empty":  # an object without text values is fine, just empty
        assert any("remote context" in r.getMessage() for r in caplog.records)


async def test_a_slow_endpoint_is_skipped(endpoint: JsonEndpoint) -> None:
    started = time.monotonic()
    assert await _fetch(_settings(endpoint.at("/slow"), timeout=0.3)) is None
    assert time.monotonic() - started < 1.5


async def test_a_closed_port_is_skipped(endpoint: JsonEndpoint) -> None:
    url = endpoint.at("/context")
    endpoint.stop()
    assert await _fetch(_settings(url)) is None


async def test_only_http_urls(endpoint: JsonEndpoint) -> None:
    configured = _settings(None).model_copy(
        update={"plugin_options": {"remote_context": {"url": "file:///etc/passwd"}}}
    )
    with pytest.raises(ConfigurationError) as caught:  # the operator's: a 503, not a 400
        await _fetch(configured)
    [error] = caught.value.errors
    assert error["field"] == "IMAGEGEN_PLUGIN_OPTIONS"
    assert error["message"].startswith("plugin_options.remote_context.url:")
    assert await _fetch(_settings("file:///etc/passwd")) is None


def _with_secrets(url: str, *, query: bool = True) -> str:
    return url.replace("//", "//user:secret@") + ("?token=secret" if query else "")


# The endpoint routes on the whole path: with a query, any path answers 500.
@pytest.mark.parametrize(
    ("path", "query"), [("/error", True), ("/big", False), ("/text", False), ("/slow", False)]
)
async def test_logs_never_show_the_url_credentials(
    endpoint: JsonEndpoint, path: str, query: bool, caplog: pytest.LogCaptureFixture
) -> None:
    url = _with_secrets(endpoint.at(path), query=query)
    with caplog.at_level(logging.DEBUG, logger="imagegen"):
        assert await _fetch(_settings(url, timeout=0.3 if path == "/slow" else 5.0)) is None
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "remote context" in logged
    assert "secret" not in logged


async def test_an_error_status_is_logged_with_its_code_and_host(
    endpoint: JsonEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await _fetch(_settings(_with_secrets(endpoint.at("/error")))) is None
    port = endpoint.port
    # The plugin's records only: an exporter thread left by another test may log meanwhile.
    said = [r.getMessage() for r in caplog.records if r.name.startswith("imagegen.plugins")]
    assert said == [f"remote context: http://***@127.0.0.1:{port} answered 500; skipped"]


async def test_a_closed_port_logs_no_credentials(
    endpoint: JsonEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    url = _with_secrets(endpoint.at("/context"))
    endpoint.stop()
    with caplog.at_level(logging.DEBUG, logger="imagegen"):
        assert await _fetch(_settings(url)) is None
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ConnectError" in logged and "secret" not in logged


async def test_one_client_and_connection_serve_the_requests_until_closed(
    endpoint: JsonEndpoint,
) -> None:
    settings = _settings(endpoint.at("/context"))
    plugin = RemoteContextPlugin(settings)
    context = PluginContext("g", None, NOW, "UTC", 1, settings, plugin="remote_context")
    for _ in range(3):
        assert await plugin.contribute(context) is not None
    assert len(endpoint.peers) == 3 and len(set(endpoint.peers)) == 1, "one kept-alive connection"

    await plugin.aclose()
    assert await plugin.contribute(context) is not None, "a closed plugin makes a new client"
    assert len(set(endpoint.peers)) == 2
    await plugin.aclose()


def test_each_event_loop_gets_its_own_client(endpoint: JsonEndpoint) -> None:
    settings = _settings(endpoint.at("/context"))
    plugin = RemoteContextPlugin(settings)
    context = PluginContext("g", None, NOW, "UTC", 1, settings, plugin="remote_context")
    # A CLI command after another, each with its own loop: connections never cross loops.
    first = asyncio.run(plugin.contribute(context))
    second = asyncio.run(plugin.contribute(context))
    assert first == second and first is not None
    assert len(set(endpoint.peers)) == 2


async def test_warm_up_makes_the_client_and_fetches_nothing(endpoint: JsonEndpoint) -> None:
    settings = _settings(endpoint.at("/context"))
    plugin = RemoteContextPlugin(settings)
    await plugin.warm_up()
    client = plugin._client
    assert client is not None and endpoint.peers == [], "made, and nothing asked of the endpoint"
    context = PluginContext("g", None, NOW, "UTC", 1, settings, plugin="remote_context")
    assert await plugin.contribute(context) is not None
    assert plugin._client is client, "the first request uses the client warmed"
    await plugin.aclose()

    unconfigured = RemoteContextPlugin(_settings(None))
    await unconfigured.warm_up()
    assert unconfigured._client is None


async def test_a_gzipped_answer_is_decompressed(endpoint: JsonEndpoint) -> None:
    result = await _fetch(_settings(endpoint.at("/gzip")))
    assert result is not None and result.data == {"values": {"weather": "fog"}}


async def test_a_gzip_bomb_is_dropped_before_it_is_decompressed(endpoint: JsonEndpoint) -> None:
    """16 KB that decompress to 16 MB, without a Content-Length: the client's own decoding made
    each chunk whole (megabytes) before the cap could be checked; within the cap, only a few
    kilobytes are ever made."""
    bomb = gzip_bomb()  # made before tracing: the endpoint's, not the plugin's
    assert len(bomb) < 32_768
    tracemalloc.start()
    try:
        assert await _fetch(_settings(endpoint.at("/gzip-bomb"))) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, f"{peak} bytes at the peak"


@pytest.mark.parametrize("path", ["/big", "/big-unannounced", "/gzip-bomb"])
async def test_a_body_over_the_cap_is_skipped_as_too_large(
    endpoint: JsonEndpoint, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Announced, unannounced or compressed: the transport's cap, in the plugin's own line."""
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await _fetch(_settings(endpoint.at(path))) is None
    [line] = _said(caplog)
    assert line.startswith("remote context: TooLarge: ") and line.endswith("; skipped"), line
    assert "4096 bytes" in line


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/brotli", "Content-Encoding br not supported"),
        ("/gzip-cut", "gzip body cut short"),
    ],
)
async def test_a_body_it_cannot_decode_is_skipped_in_a_line_naming_the_host(
    endpoint: JsonEndpoint, path: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await _fetch(_settings(endpoint.at(path))) is None
    port = endpoint.port
    assert _said(caplog) == [f"remote context: {why} from http://127.0.0.1:{port}; skipped"]


async def test_a_body_within_the_cap_as_sent_is_capped_once_decompressed(
    endpoint: JsonEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """16 KB sent, under a 64 KiB cap, that decompress to 16 MB: only the cap on the decoded
    body drops it, and the transport decodes no more than the cap (httpx's decoding makes each
    chunk whole, megabytes, before anyone can count it)."""
    settings = _settings(endpoint.at("/gzip-bomb")).model_copy(
        update={"remote_context_max_bytes": 65_536}
    )
    assert len(gzip_bomb()) < 65_536  # made before tracing: the endpoint's, not the plugin's
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
            assert await _fetch(settings) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    [line] = _said(caplog)
    assert line.startswith("remote context: TooLarge: ") and "decompressed" in line, line
    assert peak < 2_000_000, f"{peak} bytes at the peak"


@pytest.mark.parametrize("transport", [AiohttpTransport, httpx.AsyncHTTPTransport])
@pytest.mark.parametrize(("path", "cap"), [("/big-unannounced", 4096), ("/gzip-bomb", 65_536)])
async def test_a_transport_given_without_the_cap_still_drops_a_body_past_it(
    endpoint: JsonEndpoint,
    transport: type[httpx.AsyncBaseTransport],
    path: str,
    cap: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A caller's transport (httpcore's, an uncapped aiohttp one) decodes a body whole: the
    plugin still keeps no more than the cap, as sent and decompressed."""
    settings = _settings(endpoint.at(path)).model_copy(update={"remote_context_max_bytes": cap})
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await _fetch(settings, transport=transport()) is None
    [line] = _said(caplog)
    assert line.startswith(f"remote context: TooLarge: body over {cap} bytes"), line


async def test_a_transport_given_without_the_cap_still_reads_a_gzipped_answer(
    endpoint: JsonEndpoint,
) -> None:
    result = await _fetch(_settings(endpoint.at("/gzip")), transport=httpx.AsyncHTTPTransport())
    assert result is not None and result.data == {"values": {"weather": "fog"}}


async def test_json_nested_too_deep_is_skipped_with_the_plugins_warning(
    endpoint: JsonEndpoint,
    caplog: pytest.LogCaptureFixture,
    plugin_set: Callable[[Settings], PluginSet],
) -> None:
    """Under the size cap, deep enough that the parser raises RecursionError: skipped in the
    plugin's own words, not as a plugin that failed (a traceback at every request)."""
    settings = _settings(endpoint.at("/deep"))
    plugins = plugin_set(settings)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await plugins.run(generation_id="g", seed=1, now=NOW) == []
    said = [r for r in caplog.records if r.name == "imagegen.plugins"]
    assert [r.getMessage().split(":")[:2] for r in said] == [["remote context", " RecursionError"]]
    assert said[0].exc_info is None


@pytest.mark.parametrize(
    ("update", "variable"),
    [
        ({"remote_context_url": "http://[::1/"}, "IMAGEGEN_REMOTE_CONTEXT_URL"),
        ({"remote_context_url": "http://h:abc/ctx"}, "IMAGEGEN_REMOTE_CONTEXT_URL"),
        ({"remote_context_url": "http://h\x00/ctx"}, "IMAGEGEN_REMOTE_CONTEXT_URL"),
        ({"remote_context_url": "ftp://internal"}, "IMAGEGEN_REMOTE_CONTEXT_URL"),
        (
            {"plugin_options": {"remote_context": {"url": "http://[::1/"}}},
            "IMAGEGEN_PLUGIN_OPTIONS",
        ),
        (
            {"remote_context_url": "http://127.0.0.1/ctx", "remote_context_timeout": 5.0},
            "IMAGEGEN_REMOTE_CONTEXT_TIMEOUT",
        ),
        (
            {
                "plugin_options": {"remote_context": {"url": "http://127.0.0.1/ctx"}},
                "remote_context_timeout": 30.0,
            },
            "IMAGEGEN_REMOTE_CONTEXT_TIMEOUT",
        ),
    ],
)
def test_the_endpoint_settings_are_refused_where_the_plugin_set_is_made(
    update: dict[str, object], variable: str
) -> None:
    """Named once, as the settings' fault, where the plugin set is made: not a traceback at
    every request (a URL urllib cannot split), nor a timeout the plugin is cut off before."""
    settings = Settings(plugins=["remote_context"]).model_copy(update=update)
    with pytest.raises(ConfigurationError) as refused:
        PluginSet.from_settings(settings)
    assert refused.value.fields == [variable]
    assert refused.value.message.startswith(f"invalid settings: {variable} (")
    assert "::1" not in refused.value.message and "abc" not in refused.value.message


def test_the_endpoint_settings_that_can_work_are_taken() -> None:
    base = Settings(plugins=["remote_context"])
    for update in (
        {"remote_context_url": "https://user:token@example.org/ctx?x=1"},
        {"remote_context_url": "http://127.0.0.1:8080/ctx", "remote_context_timeout": 4.9},
        {"remote_context_timeout": 30.0},  # no endpoint: nothing waits on it
    ):
        assert PluginSet.from_settings(base.model_copy(update=update)).names == ("remote_context",)
    # A plugin set given a longer time limit takes a longer fetch.
    longer = base.model_copy(
        update={"remote_context_url": "http://127.0.0.1/ctx", "remote_context_timeout": 30.0}
    )
    assert PluginSet.from_settings(longer, timeout=60).names == ("remote_context",)


async def test_a_url_that_cannot_be_split_is_skipped_in_a_line(
    caplog: pytest.LogCaptureFixture, plugin_set: Callable[[Settings], PluginSet]
) -> None:
    """In a plugin set made without the settings' check: a warning, not a plugin that failed."""
    settings = _settings("http://[::1/")
    plugins = plugin_set(settings)
    with caplog.at_level(logging.WARNING, logger="imagegen.plugins"):
        assert await plugins.run(generation_id="g", seed=1, now=NOW) == []
    said = [r for r in caplog.records if r.name == "imagegen.plugins"]
    assert len(said) == 1 and said[0].exc_info is None
    assert said[0].getMessage().startswith("remote_context_url: not a valid URL")
