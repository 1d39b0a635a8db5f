"""``imagegen plugins``, ``serve`` and ``send``: tools around the functions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from imagegen import stages
from imagegen.cli._app import (
    AsJson,
    app,
    markup,
    out,
    run_async,
    run_blocking,
    settings_from,
)
from imagegen.cli.history import _names, _setting_option, check_token
from imagegen.errors import DependencyUnavailable, ImageGenError, InvalidRequest
from imagegen.events import GENERATION_FAILED, GENERATION_REQUESTED

__all__ = [
    "RENDER_EXTRA",
    "check_render_extra",
    "functions_dir",
    "list_plugins",
    "not_installed",
    "refused_options",
    "send",
    "serve",
]


@app.command(name="plugins")
def list_plugins(as_json: AsJson = False) -> None:
    """List the discovered prompt plugins and whether they are enabled."""
    import dataclasses

    from rich.table import Table

    settings = settings_from()  # first: the plugins import OpenTelemetry (OTEL_PROPAGATORS)

    from imagegen.plugins import PluginSet

    enabled = list(dict.fromkeys(settings.plugins))
    # Enabled as a request would enable them; a plugin that cannot load is a row with its
    # error, not a failure of the listing that should show it. Names no installed plugin has
    # are still refused, as every command refuses them.
    plugin_set = PluginSet.from_settings(settings, names=[])
    try:
        plugin_set.set_order(enabled)
    except InvalidRequest:
        if any(name not in plugin_set.available for name in enabled):
            raise
    refused = run_async(lambda: refused_options(plugin_set))
    infos = sorted(
        (
            dataclasses.replace(
                info, enabled=info.name in enabled, error=info.error or refused.get(info.name)
            )
            for info in plugin_set.describe()
        ),
        key=lambda info: enabled.index(info.name) if info.name in enabled else len(enabled),
    )
    if as_json:
        typer.echo(json.dumps([_plain(i) for i in infos], indent=2))
        return
    table = Table("plugin", "enabled", "description", "from")
    for info in infos:
        row = _plain(info)
        description = str(row.get("description", ""))
        if row.get("name") in refused:
            description = f"refuses its options: {row['error']}"
        elif row.get("error"):
            description = f"cannot be loaded: {row['error']}"
        table.add_row(
            markup(str(row.get("name")), one_line=True),
            "yes" if row.get("enabled") else "no",
            markup(description, one_line=True),
            markup(str(row.get("source") or row.get("module") or ""), one_line=True),
        )
    out.print(table)


async def refused_options(plugin_set: Any) -> dict[str, str]:
    """The enabled plugins that refuse the options the settings give them, each with why.

    A key the plugin does not declare is refused as a generation refuses it; then each runs
    once on a test prompt, as a generation runs it: a plugin reads its options when it runs,
    and one it refuses fails every generation alike.
    """
    from datetime import UTC, datetime

    refused: dict[str, str] = {}
    for error in plugin_set.option_errors(plugin_set.settings.plugin_options):
        name = error["field"].split(".")[1]  # plugin_options.<plugin>[.<key>]
        if name in plugin_set.names:
            said = f"{error['field']}: {error['message']}"
            refused[name] = f"{refused[name]}; {said}" if name in refused else said
    try:
        for name in plugin_set.names:
            if name in refused:
                continue
            try:
                await plugin_set.run(
                    generation_id="0" * 32,
                    seed=0,
                    now=datetime.now(UTC),
                    prompt="a test",
                    selection=[name],
                )
            except ImageGenError as exc:
                refused[name] = "; ".join(e["message"] for e in exc.errors) or exc.message
    finally:
        await plugin_set.aclose()
    return refused


def _plain(info: Any) -> dict[str, Any]:
    if hasattr(info, "model_dump"):
        return dict(info.model_dump(mode="json"))
    if hasattr(info, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(info)
    return dict(info)


@app.command()
def serve(
    stage: Annotated[
        str,
        typer.Argument(
            help="The stage to serve: " + ", ".join(stages.names()) + ".",
            autocompletion=lambda: list(stages.names()),
        ),
    ],
    port: Annotated[
        # Checked here: gunicorn's own refusal of a port is a page of traceback.
        int, typer.Option(envvar="PORT", min=1, max=65535, help="Port to listen on (1-65535).")
    ] = 8080,
    host: Annotated[
        str, typer.Option(help="Address to bind; an IPv6 one bare or in brackets (::1, [::1]).")
    ] = "127.0.0.1",
    debug: Annotated[
        bool, typer.Option(help="Flask's development server instead of gunicorn.")
    ] = False,
) -> None:
    """Run one function locally, as it runs on Knative (functions-framework's own command)."""
    if stage not in stages.names():
        raise InvalidRequest(
            f"unknown stage {stage!r}; choose one of {', '.join(stages.names())}",
            errors=[{"field": "stage", "message": "not a registered stage"}],
        )
    source = functions_dir() / f"{stage}.py"
    if not source.is_file():  # functions-framework would say so in a page of traceback
        raise InvalidRequest(
            f"no {stage} function: {source} does not exist",
            errors=[{"field": "stage", "message": "does not exist"}],
        )
    # Refused here in one line, as every command refuses them: the function would start, say
    # where it serves, and answer 503 to each request until stopped. What it checks as it
    # starts, checked alike: its storage opened (nothing reached), as a command that stores
    # images opens it, and local storage written to, as the function's service does as it
    # starts (ImageGenService's entry); and what the stage makes of the settings (enhance's
    # plugin set).
    settings = settings_from(storage_url=None)
    _check_local_storage(settings)
    prepare = stages.get(stage).prepare
    if prepare is not None:
        prepare(settings)
    if stages.get(stage).loads_model:  # the function would answer 503 until it is installed
        check_render_extra()
    from imagegen.cli import _server

    # An IPv6 address, bare or in brackets: bound bare, written in brackets before a port
    # (RFC 3986's IP-literal), as gunicorn reads the "host:port" functions-framework makes of
    # it (functions_framework/_http/gunicorn.py; gunicorn/util.py, parse_address). Werkzeug
    # (--debug) takes the bare address (werkzeug/serving.py, select_address_family).
    bare, shown = _server.address(host)
    _check_bind(bare, port)
    arguments = ["--target", stage, "--source", str(source)]
    arguments += ["--host", bare if debug else shown, "--port", str(port)]
    _server.start(arguments + (["--debug"] if debug else []))


RENDER_EXTRA = ("torch", "diffusers", "huggingface_hub")
"""What rendering and pulling models import first of the render extra."""


def check_render_extra() -> None:
    """Refuse an install without the render extra, in the line rendering refuses it with
    (``generate``'s), before a render function or a pull starts. Looked for without importing
    torch (seconds): only where one is missing is the backend imported, to say which.

    Raises:
        RenderExtraMissing: a :class:`~imagegen.errors.ConfigurationError` naming what is
            not installed and how to install it.
    """
    import importlib

    if not_installed(*RENDER_EXTRA) is None:
        return
    # Raises the backend's own error, naming the first of them it cannot import; off the main
    # thread, as torch is imported wherever it is (run_blocking).
    run_blocking(importlib.import_module, "imagegen.render.diffusers_backend")


def not_installed(*names: str) -> str | None:
    """The first of the top-level packages ``names`` that is not installed, looked for
    without importing it; None when all are. One that is there and fails to import is
    installed all the same: broken, not missing."""
    from importlib.util import find_spec

    return next((name for name in names if find_spec(name) is None), None)


def _check_local_storage(settings: Any) -> None:
    """Refuse local storage the function could not write (a file where its folder should be,
    a read-only folder, a full disk), as its service refuses it as it starts; object storage
    is not reached, as the service does not reach it then.

    Raises:
        DependencyUnavailable: the folder cannot be made or written to.
        ConfigurationError: a link among its entries leads outside it.
    """
    from imagegen.storage import open_storage
    from imagegen.storage.local import LocalStorage

    storage = open_storage(settings)
    if isinstance(storage, LocalStorage):
        run_async(storage.check)


def _check_bind(host: str, port: int) -> None:
    """Refuse, in one line, an address gunicorn cannot listen on: it would retry for five
    seconds and print a line a second before giving up (a port in use, a host that is no
    address of this machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidRequest(
            f"--host: {host!r} is not an address to listen on ({exc})",
            errors=[{"field": "host", "message": "not an address"}],
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise DependencyUnavailable(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None


def functions_dir() -> Path:
    """The ``functions/`` folder: ``IMAGEGEN_FUNCTIONS_DIR``, else the checkout imagegen is
    imported from (an editable install), else the current directory's (the image's ``/app``).

    An installed package carries no ``functions/``: they are the deployment's adapters, copied
    into the images beside it, not part of the library.
    """
    configured = os.environ.get("IMAGEGEN_FUNCTIONS_DIR")
    if configured and not (Path(configured) / "_adapter.py").is_file():
        raise InvalidRequest(
            "IMAGEGEN_FUNCTIONS_DIR names no functions/ folder (no _adapter.py in it)",
            errors=[{"field": "IMAGEGEN_FUNCTIONS_DIR", "message": "no functions/ folder"}],
        )
    checkout = Path(__file__).resolve().parents[2]  # site-packages, for an installed package
    candidates = [Path(configured)] if configured else []
    if (checkout / "pyproject.toml").is_file():
        candidates.append(checkout / "functions")
    candidates.append(Path.cwd() / "functions")
    for candidate in candidates:
        if (candidate / "_adapter.py").is_file():
            return candidate
    raise InvalidRequest(
        "functions/ not found: an installed imagegen has none; run from a checkout or"
        " the image's /app, or set IMAGEGEN_FUNCTIONS_DIR to a functions/ folder"
    )


def _check_to(to: str, token: str | None, key_as: str) -> None:
    """Refuse a ``--to`` that is no http(s) URL with a host before anything is sent: it is
    bad input (exit 2), not a server that could not be reached. Said as every message says
    the URL: a password in it is not shown."""
    from urllib.parse import urlsplit

    from imagegen._redact import redact_url

    try:
        parts = urlsplit(to)
        # Read here: httpx takes a port past 65535 modulo 65536, another port altogether.
        parts.port  # noqa: B018
    except ValueError as exc:  # a bracketed host that is no IPv6 address, a bad port
        raise InvalidRequest(
            f"--to: {redact_url(to)!r} is not a valid URL: {exc}",
            errors=[{"field": "to", "message": "not a valid URL"}],
        ) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(
            f"--to: {redact_url(to)!r} is not an http:// or https:// URL with a host",
            errors=[{"field": "to", "message": "not an http:// or https:// URL with a host"}],
        )
    if token and (parts.username or parts.password):
        # httpx turns a URL's user and password into its own Authorization header, which
        # replaces the bearer key: the function would see a password, never the key.
        raise InvalidRequest(
            f"--to: {redact_url(to)!r} holds a user or password and {key_as} is given;"
            " give the key alone",
            errors=[{"field": "to", "message": f"a user or password beside {key_as}"}],
        )


# The longest --timeout taken: a day, more than any reply takes; far longer ones (1e10 s)
# overflow the clock's deadline arithmetic (OverflowError).
MAX_TIMEOUT = 86400.0


@app.command()
def send(
    ctx: typer.Context,
    event_type: Annotated[
        str,
        typer.Argument(
            metavar="TYPE",
            # Not the list of every consumed type: that would import every stage's models
            # for any command's --help.
            help=f"CloudEvents type, e.g. {GENERATION_REQUESTED}.",
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="URL: a function or a broker ingress.")],
    data: Annotated[str, typer.Option("--data", help="Event data as JSON.")] = "{}",
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "/imagegen/cli",
    subject: Annotated[str | None, typer.Option(help="Subject: the generation id.")] = None,
    event_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="CloudEvents id (default: a new one). The same id and --source again send"
            " the same event, as a broker's redelivery does.",
        ),
    ] = None,
    mode: Annotated[Literal["binary", "structured"], typer.Option(help="Content mode.")] = "binary",
    timeout: Annotated[
        float,
        typer.Option(help="Seconds to wait for the whole reply (at most 86400)."),
    ] = 600.0,
    token: Annotated[
        str | None,
        _setting_option(
            "--token",
            "IMAGEGEN_API_KEY",
            "API key for a function that requires one (sent as a bearer token).",
        ),
    ] = None,
) -> None:
    """Post a CloudEvent and print the reply."""
    import asyncio
    import math
    import uuid

    import httpx
    from cloudevents.conversion import to_binary, to_structured
    from cloudevents.http import CloudEvent

    from imagegen._redact import redact_url
    from imagegen.events import header_value, text_problem
    from imagegen.validation import loads

    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise InvalidRequest(
            f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g},"
            f" not {timeout}",
            errors=[{"field": "timeout", "message": "not a number above 0, at most 86400"}],
        )
    # As the functions read a body: NaN and Infinity, which Python reads, are no JSON (RFC 8259,
    # section 6), and what is wrong is said of the data, never in the interpreter's words.
    payload = loads(data, field="--data")
    key_as = _names(ctx).key  # the option, or IMAGEGEN_API_KEY that gave it
    check_token(token, key_as)
    _check_to(to, token, key_as)
    # CloudEvents 1.0: id, source and type are REQUIRED, each a non-empty string; and a String
    # holds no control character, surrogate (bytes of an argument that are no UTF-8) or
    # noncharacter: refused here as the functions refuse it, before it is encoded.
    named = (("TYPE", event_type), ("--source", source), ("--id", event_id), ("--subject", subject))
    for name, value in named:
        if value is not None and not value and name != "--subject":
            raise InvalidRequest(
                f"{name}: must not be empty",
                errors=[{"field": name.lstrip("-").lower(), "message": "must not be empty"}],
            )
        if value and (problem := text_problem(value)):
            raise InvalidRequest(
                f"{name}: {problem}",
                errors=[{"field": name.lstrip("-").lower(), "message": problem}],
            )
    attributes = {"type": event_type, "source": source, "id": event_id or uuid.uuid4().hex}
    if subject:
        attributes["subject"] = subject
    event = CloudEvent(attributes, payload)
    headers, body = (to_binary if mode == "binary" else to_structured)(event)
    # Binary mode: each attribute a header, percent-encoded as the HTTP binding has it (section
    # 3.1.3.2), so the function reads the attributes structured mode sends ("/a%41" stays
    # "/a%41"): one event, one generation, in either mode.
    headers = {k: header_value(v) if k.startswith("ce-") else v for k, v in headers.items()}
    if token:
        headers = {**headers, "Authorization": f"Bearer {token}"}

    async def post() -> httpx.Response:
        # httpx's timeout bounds each read, not the reply: one byte a second would keep it
        # waiting for ever. The deadline is over the whole request, body included.
        async with httpx.AsyncClient(timeout=timeout) as client, asyncio.timeout(timeout):
            return await client.post(to, headers=headers, content=body)

    try:
        reply = run_async(post)
    # None is an HTTPError: the URL is wrong (a bad port, a host IDNA refuses), not the network.
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as exc:
        raise InvalidRequest(
            f"--to: {redact_url(to)!r} is not a valid URL: {exc}",
            errors=[{"field": "to", "message": "not a valid URL"}],
        ) from None
    except (httpx.TimeoutException, TimeoutError):
        raise ImageGenError(
            f"{redact_url(to)} did not reply within {timeout:g} s (--timeout)"
        ) from None
    except httpx.HTTPError as exc:
        raise ImageGenError(f"could not reach {redact_url(to)}: {exc}") from None
    typer.echo(json.dumps(_printed_reply(reply), indent=2, allow_nan=False))
    # Anything but a 2xx delivered nothing (a 3xx too: redirects are not followed), and a
    # generation.failed reply is a failure the function answered 2xx (for the broker).
    if not reply.is_success or reply.headers.get("ce-type") == GENERATION_FAILED:
        raise typer.Exit(1)


def _lossy(reply: Any) -> bool:
    """Whether ``reply``'s text replaces bytes: ones its charset (or UTF-8, where it names
    none or one Python does not know, as httpx decodes it) cannot decode."""
    try:
        reply.content.decode(reply.encoding or "utf-8")
    except (UnicodeDecodeError, LookupError):
        return True
    return False


def _printed_reply(reply: Any) -> dict[str, Any]:
    """What ``send`` prints of a reply: its status, its ``ce-`` headers and ``Retry-After``
    (when to ask again, of a 429 or 503), and its body: JSON as JSON, other text as a string,
    anything else (an image) base64-encoded under ``data_base64``, as the CloudEvents JSON
    format carries binary data. JSON is read strictly, as the functions read a body: a reply
    holding ``NaN`` or ``Infinity`` is no JSON (RFC 8259, section 6), and is printed as text,
    so that what is printed is always JSON."""
    import base64

    from imagegen.validation import loads

    ce = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
    printed: dict[str, Any] = {"status": reply.status_code, "attributes": ce}
    if "retry-after" in reply.headers:
        printed["retry_after"] = reply.headers["retry-after"]
    # The bytes, where they are to be UTF-8 (JSON's own encoding, RFC 8259 section 8.1):
    # decoded leniently, bytes that are no UTF-8 would parse as U+FFFD and be lost.
    charset = (reply.charset_encoding or "utf-8").lower().replace("_", "-")
    utf8 = charset in ("utf-8", "utf8")
    body = reply.content if utf8 else reply.text
    try:
        printed["data"] = loads(body, field="reply")
    except InvalidRequest:
        media = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        textual = not media or media.startswith("text/") or "json" in media
        if not reply.content or (textual and not _lossy(reply)):
            printed["data"] = reply.text
        else:  # read as text, bytes that are no text would be lost
            printed["data_base64"] = base64.b64encode(reply.content).decode("ascii")
    return printed
