"""Context from a remote JSON endpoint: weather, a campaign theme, anything an operator serves.

The endpoint (``settings.remote_context_url``, or the operator's
``plugin_options.remote_context.url``; never a request's) must answer a JSON object; its
string values become the fragment. The body is read streamed and dropped past
``remote_context_max_bytes``, as sent and once decompressed (the transport's cap,
:class:`~imagegen._http.AiohttpTransport`'s ``max_body``); the whole fetch is bounded by
``remote_context_timeout``, which must be below the plugins' time limit. Only data is read:
nothing fetched is ever imported or evaluated. A slow, failing or malformed endpoint is logged
and adds nothing; a URL that cannot be fetched, or a timeout the plugin could never wait for,
is refused where the plugin set is made (:meth:`RemoteContextPlugin.setting_errors`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imagegen._redact import redact_url
from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.plugins import PluginContext
from imagegen.settings import Settings, _http_url
from imagegen_plugins._options import invalid_option, invalid_setting, option_str

if TYPE_CHECKING:
    import httpx

# httpx and aiohttp (about 0.2 s of imports) load where a fetch needs them, not with the
# plugin: enhance makes its plugin set before it is ready, and with no endpoint configured this
# plugin never fetches.

__all__ = ["MAX_VALUES", "MAX_VALUE_CHARS", "RemoteContextPlugin", "TooLarge"]

logger = logging.getLogger("imagegen.plugins")

MAX_VALUES = 16
MAX_VALUE_CHARS = 200
_MAX_TEXT_CHARS = 1000


class TooLarge(Exception):
    """The endpoint sent more than the configured cap."""


def _origin(url: str) -> str:
    """Where ``url`` points, for logs: its user-info, path and query can hold tokens."""
    parts = urlsplit(redact_url(url))
    return f"{parts.scheme}://{parts.netloc}"


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched, in words that never quote it (it may hold a token); None
    when it can: an absolute http(s) URL with a host, as every URL setting is held to, that the
    client parses too."""
    try:
        _http_url(url)
    except ValueError as exc:
        return str(exc)
    import httpx

    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        return "not a valid URL"
    return None


def _encodable(text: str) -> bool:
    """Whether ``text`` is UTF-8 text: JSON's ``\\ud800`` escape makes a lone surrogate, which
    no event can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _values(document: dict[str, Any]) -> dict[str, str]:
    """The document's string values (at most :data:`MAX_VALUES`), blanks folded, each cut
    short; one that is not UTF-8 text is logged and left out, the others kept."""
    values: dict[str, str] = {}
    for key, value in document.items():
        if len(values) == MAX_VALUES:
            break
        if isinstance(value, str) and (text := re.sub(r"\s+", " ", value).strip()):
            name, text = str(key)[:64], text[:MAX_VALUE_CHARS]
            if not (_encodable(name) and _encodable(text)):
                # ascii(): the key itself may hold the surrogate, which a log line cannot.
                logger.warning("remote context: %s is not UTF-8 text; left out", ascii(name))
                continue
            values[name] = text
    return values


class RemoteContextPlugin:
    """Adds the string values of a JSON object fetched from a configured URL."""

    name = "remote_context"
    description = "String values of a JSON object fetched from remote_context_url."
    # ``url`` is read from the operator's options only; a request's is accepted and ignored.
    option_names = ("url",)

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        # aiohttp under the httpx client, as for Ollama (docs/adr/0012): about a third less CPU
        # a fetch than httpcore's pool. Its cap bounds the body as sent and once decompressed,
        # a chunk at a time; a transport given here should be made with that cap too (fetch
        # still drops a body past it, but cannot bound what one chunk decompresses to).
        self._transport: httpx.AsyncBaseTransport | None = transport  # else made with the client
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        """The plugin's client on the running loop: made once, its connections kept alive.

        A client per request would make a TLS context (tenths of a second of CPU on a small
        machine, loading the CA bundle) and open a connection for each one. A client's
        connections belong to the loop that opened them, so another loop gets its own.
        """
        import httpx

        loop = asyncio.get_running_loop()
        if self._transport is None:
            from imagegen._http import AiohttpTransport

            self._transport = AiohttpTransport(max_body=self.settings.remote_context_max_bytes)
        if self._client is None or self._client_loop is not loop:
            timeout = self.settings.remote_context_timeout
            self._client = httpx.AsyncClient(timeout=timeout, transport=self._transport)
            self._client_loop = loop
        return self._client

    async def warm_up(self) -> None:
        """Make the client (and its TLS context) when an endpoint is configured; fetch nothing."""
        configured = self.settings.plugin_options.get(self.name, {})
        if option_str(configured, self.name, "url") or self.settings.remote_context_url:
            from imagegen._http import AiohttpTransport

            self._http()
            if isinstance(self._transport, AiohttpTransport):
                self._transport.tls_context()

    async def aclose(self) -> None:
        """Close the client's connections (the enhance stage calls this as it closes)."""
        client, self._client = self._client, None
        if client is not None and self._client_loop is asyncio.get_running_loop():
            await client.aclose()

    def setting_errors(self, time_limit: float) -> list[dict[str, str]]:
        """What is wrong with the settings this plugin reads, one entry per setting (its name as
        ``field``); asked once, where the plugin set is made from the settings.

        The endpoint's URL, the setting's or the operator's option, must be one the client can
        fetch. With an endpoint, ``remote_context_timeout`` must be below ``time_limit``, the
        seconds each call of the plugin gets: it is cut off there, whatever the setting says.
        """
        errors: list[dict[str, str]] = []
        configured = self.settings.plugin_options.get(self.name, {})
        option = configured.get("url")
        if option is not None and option != "":
            problem = _url_problem(option) if isinstance(option, str) else "must be text"
            if problem:
                said = f"plugin_options.{self.name}.url: {problem}"
                errors.append({"field": "plugin_options", "message": said})
        url = self.settings.remote_context_url
        if url and (problem := _url_problem(url)):
            errors.append({"field": "remote_context_url", "message": problem})
        timeout = self.settings.remote_context_timeout
        if (option or url) and timeout >= time_limit:
            errors.append(
                {
                    "field": "remote_context_timeout",
                    "message": f"{timeout:g}s is not below the plugins' time limit"
                    f" ({time_limit:g}s), which would cut the fetch off first",
                }
            )
        return errors

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, at most ``remote_context_max_bytes`` long, as sent and decoded.

        The plugin's own transport holds the cap: it decompresses gzip and deflate a chunk at a
        time, never past the cap (a few hundred compressed kilobytes may decompress to
        gigabytes), and refuses codings it cannot bound. The endpoint is asked for gzip or
        nothing, but may send a coding unasked. The lengths are counted here as well, for a
        transport given without that cap: the body is then dropped once past it, though httpx
        has decoded each chunk whole by the time it is counted.

        Raises:
            httpx.HTTPError: the request failed or the status is not 2xx; a
                :class:`httpx.DecodingError` for a body it cannot decompress.
            TooLarge: the body is over the cap.
        """
        from imagegen._http import BodyTooLarge

        cap = self.settings.remote_context_max_bytes
        headers = {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
            "User-Agent": "imagegen-remote-context",
        }
        body = bytearray()
        try:
            async with self._http().stream("GET", url, headers=headers) as response:
                response.raise_for_status()
                async for chunk in response.aiter_bytes():
                    if response.num_bytes_downloaded > cap:  # as sent, where httpx decodes
                        raise TooLarge(f"body over {cap} bytes")
                    if len(body) + len(chunk) > cap:
                        raise TooLarge(f"body over {cap} bytes, decompressed")
                    body += chunk
        except BodyTooLarge as exc:  # the transport's cap; its message holds no URL
            raise TooLarge(str(exc)) from None
        return bytes(body)

    async def contribute(self, context: PluginContext) -> Contribution | None:
        """The endpoint's string values; None when unconfigured, slow, failing or malformed."""
        # Only the operator picks the endpoint: a URL from a request would let any caller make
        # the service fetch arbitrary (internal) addresses. So a bad one is the operator's
        # fault (a 503 naming the setting), even where the request gave a url of its own.
        # The plugin set made from the settings refuses both at start-up (setting_errors);
        # a set made otherwise meets them here.
        configured = self.settings.plugin_options.get(self.name, {})
        try:
            option = option_str(configured, self.name, "url")
            if option is not None and (problem := _url_problem(option)):
                raise invalid_option(self.name, "url", problem)
        except InvalidRequest as exc:
            raise invalid_setting(self.settings, exc) from None
        url = option or self.settings.remote_context_url
        if not url:
            return None
        if not option and (problem := _url_problem(url)):
            logger.warning("remote_context_url: %s; skipped", problem)
            return None
        import httpx

        timeout = self.settings.remote_context_timeout
        try:
            async with asyncio.timeout(timeout):
                body = await self.fetch(url)
            document = json.loads(body)
        except TimeoutError:
            logger.warning("remote context: no answer within %.2fs; skipped", timeout)
            return None
        except httpx.HTTPStatusError as exc:
            # Not the error's text: it holds the whole URL, query (and any token) included.
            status = exc.response.status_code
            logger.warning("remote context: %s answered %d; skipped", _origin(url), status)
            return None
        except httpx.DecodingError as exc:  # its message is the plugin's own: no URL in it
            logger.warning("remote context: %s from %s; skipped", exc, _origin(url))
            return None
        except httpx.HTTPError as exc:
            logger.warning("remote context: %s from %s; skipped", type(exc).__name__, _origin(url))
            return None
        except (TooLarge, ValueError, RecursionError) as exc:
            # RecursionError: JSON nested deeper than the parser recurses, well under the cap.
            logger.warning("remote context: %s: %s; skipped", type(exc).__name__, exc)
            return None
        if not isinstance(document, dict):
            logger.warning(
                "remote context: %s is not a JSON object; skipped", type(document).__name__
            )
            return None
        values = _values(document)
        if not values:
            return None
        return Contribution(
            plugin=self.name,
            text=", ".join(values.values())[:_MAX_TEXT_CHARS],
            data={"values": values},
        )
