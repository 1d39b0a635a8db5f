"""remote_context: JSON objects only, bounded in time and size; failures add nothing."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from imagegen.errors import ConfigurationError
from imagegen.models import Contribution
from imagegen.plugins import PluginContext, PluginSet
from imagegen.settings import Settings
from imagegen_plugins.remote_context import RemoteContextPlugin
from tests.plugins.conftest import NOW, JsonEndpoint


def _settings(url: str | None, *, timeout: float = 5.0) -> Settings:
    """Settings for ``url``; ``timeout`` short only where the endpoint is made to hang."""
    return Settings(
        remote_context_url=url,
        remote_context_timeout=timeout,
        remote_context_max_bytes=4096,
    )


async def _fetch(settings: Settings, **options: object) -> Contribution | None:
    context = PluginContext(
        "g", None, NOW, "UTC", 1, settings, options=options, plugin="remote_context"
    )
    return await RemoteContextPlugin(settings).contribute(context)


async def test_string_values_become_context(endpoint: JsonEndpoint) -> None:
    result = await _fetch(_settings(endpoint.at("/context")))
    assert result is not None
    assert result.data == {"values": {"weather": "light rain and mist", "mood": "calm"}}
    assert result.text == "light rain and mist, calm"


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
    endpoint: JsonEndpoint,
) -> None:
    """The plugin reads the operator's url alone: a request's is ignored, so a bad one is
    never the request's fault (a 400 that drops the event), but the setting's (a 503)."""
    settings = _settings(None).model_copy(
        update={
            "plugins": ["remote_context"],
            "plugin_options": {"remote_context": {"url": "ftp://internal"}},
        }
    )
    plugins = PluginSet.from_settings(settings)
    for options in ({}, {"remote_context": {"url": endpoint.at("/context")}}):
        with pytest.raises(ConfigurationError) as caught:
            await plugins.run(generation_id="g", seed=1, now=NOW, options=options)
        assert caught.value.status == 503
        assert caught.value.fields == ["IMAGEGEN_PLUGIN_OPTIONS"]


async def test_no_url_no_request() -> None:
    assert await _fetch(_settings(None)) is None


@pytest.mark.parametrize("path", ["/big", "/big-unannounced", "/text", "/list", "/error", "/empty"])
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
