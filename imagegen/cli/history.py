"""``imagegen status``, ``history``, ``replay`` and ``ledger``: the generation ledger.

Each reads the local ledger (a SQLite file; ``IMAGEGEN_LEDGER_URL`` or ``--ledger`` name another
database) or, given an ``http(s)://`` ledger URL, the ledger function's HTTP API. ``replay``
then records its new generation as ``generate`` does (through the ledger function it asks the
function to replay, and its cluster renders), and ``ledger prune`` deletes.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from imagegen.cli._app import (
    AsJson,
    app,
    cancel_on_termination,
    dotenv_warnings,
    err,
    exit_at_once,
    make_service,
    markup,
    out,
    output_after,
    printable,
    refuse_empty,
    run_async,
    say_stopped,
    settings_from,
    warn_newer_schema,
)
from imagegen.errors import ConfigurationError, DependencyUnavailable, InvalidRequest, NotFound
from imagegen.identity import key_time

if TYPE_CHECKING:
    from pydantic import BaseModel

    from imagegen.ledger import Ledger
    from imagegen.models import EnhancedPrompt
    from imagegen.settings import Settings

__all__ = ["history", "ledger_app", "parse_when", "replay", "status"]


def _or_dotenv(variable: str) -> Callable[[str | None], str | None]:
    """An option's callback: not given, and not in the environment, ``variable`` from
    ``./.env``, as every setting is read (python-dotenv, UTF-8; the environment wins)."""

    def default(value: str | None) -> str | None:
        if value is not None or not os.path.isfile(".env"):
            return value
        from dotenv import dotenv_values

        try:
            with dotenv_warnings():
                return dotenv_values(".env", encoding="utf-8").get(variable) or None
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigurationError(
                f".env cannot be read ({type(exc).__name__})",
                errors=[{"field": ".env", "message": "not a readable UTF-8 file"}],
            ) from None

    return default


def _setting_option(name: str, variable: str, help: str) -> Any:
    """An option that defaults to ``variable``: from the environment, else ``./.env``."""
    return typer.Option(
        name, help=help, envvar=variable, show_envvar=False, callback=_or_dotenv(variable)
    )


LedgerUrl = Annotated[
    str | None,
    _setting_option(
        "--ledger",
        "IMAGEGEN_LEDGER_URL",
        "Ledger: a database URL or path, or the ledger function's http(s):// URL.",
    ),
]
LedgerDatabase = Annotated[
    str | None,
    _setting_option(
        "--ledger",
        "IMAGEGEN_LEDGER_URL",
        "Ledger database: a postgresql:// or sqlite:/// URL, or a path (not http(s)://).",
    ),
]
LedgerToken = Annotated[
    str | None,
    _setting_option(
        "--token",
        "IMAGEGEN_API_KEY",
        "API key for an http(s):// ledger that requires one (sent as a bearer token).",
    ),
]
_RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_FINER = re.compile(r"[.,]\d{6}\d*[1-9]")  # a fraction of a second finer than a microsecond


def parse_when(text: str, *, field: str, now: datetime | None = None) -> datetime:
    """``2026-06-01``, ``2026-06-01T12:00Z``, ``today``, or an age (``30m``, ``2h``, ``7d``).

    A date or time without an offset, and ``today``, are in this machine's time zone (``TZ``),
    as the person typing them means them (:func:`_local_instant`): a date, as ``today``, is
    the first instant of its local day, even where the clock skips its midnight.
    """
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    if value == "today":
        return _start_of_local_day(now.astimezone().date())
    match = _RELATIVE.match(value)
    finer = False  # a fraction of a second past the microsecond that Python's reader keeps
    if match:
        try:
            parsed = now - timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            raise InvalidRequest(
                f"--{field}: {text!r} reaches back further than a date can",
                errors=[{"field": field, "message": "age out of range"}],
            ) from None
    else:
        try:
            parsed = datetime.fromisoformat(text.strip())
            finer = _FINER.search(text) is not None
            if parsed.tzinfo is None:  # local time, given its offset
                wall, parsed = parsed, _local_instant(parsed)
                # A time the clock skips is the moment it jumps, to the microsecond.
                finer = finer and parsed.astimezone().replace(tzinfo=None) == wall
        except (ValueError, OverflowError):
            raise InvalidRequest(
                f"--{field}: {text!r} is neither a date/time (ISO 8601) nor an age like 2h or 7d",
                errors=[{"field": field, "message": "not an ISO date or an age"}],
            ) from None
    try:  # the times the ledger's HTTP API takes, on a local ledger too
        parsed = key_time(parsed)
    except ValueError as exc:
        raise InvalidRequest(
            f"--{field}: {text!r} {exc}", errors=[{"field": field, "message": str(exc)}]
        ) from None
    if finer:
        # A bound: raised to the next microsecond, as the ledger's API raises one
        # (imagegen.ledger.api), where Python's reader drops the digits past it. It is the
        # instant that is raised, not its wall time, whose next microsecond may be an hour
        # later where the clock is set back. In 2999's last microsecond it stays there, the
        # last one the range takes.
        with suppress(ValueError):
            parsed = key_time(parsed + timedelta(microseconds=1))
    return parsed


def _start_of_local_day(day: date) -> datetime:
    """The first instant of ``day`` in this machine's time zone (``TZ``), with its offset.

    Its midnight, where the day has one; a clock put forward over midnight (America/Santiago
    on 6 September 2026: 00:00 is 01:00) starts the day at that change instead.
    """
    return _local_instant(datetime.combine(day, dt_time()))


def _local_instant(wall: datetime) -> datetime:
    """The instant the naive local time ``wall`` names in this machine's time zone (``TZ``),
    with its offset.

    A time the clock shows twice (set back) is the first of them; one it skips (put forward)
    is the first instant after the skip, the moment it jumps: 00:30 in America/Santiago on
    6 September 2026 is 01:00 -03:00, never 23:30 the day before. Read with the C library's
    zone, as every local time here is (``astimezone()``): ``TZ`` may be a POSIX rule or unset,
    which no IANA name gives.
    """
    # PEP 495: a local time that is missing or repeated has two readings, fold 0 and fold 1.
    # Where it is repeated, both read back as it and the earlier is taken; where it is
    # missing, neither does, and the change between them is the first instant after it.
    # Zones change at whole seconds: the search is in seconds, the microseconds added back.
    whole = wall.replace(microsecond=0, fold=0)
    try:
        readings = sorted(int(whole.replace(fold=fold).timestamp()) for fold in (0, 1))
    except (OverflowError, ValueError, OSError):
        # At the calendar's ends (the years 1 and 9999), which no ledger's time reaches:
        # read as astimezone() reads it, for the range check to name.
        return wall.astimezone()
    for reading in readings:
        if _local_at(reading).replace(tzinfo=None) == whole:
            return _local_at(reading).replace(microsecond=wall.microsecond)
    before, after = readings  # the clock shows a time before ``wall``, then one after it
    while after - before > 1:  # the change, to the second
        middle = (before + after) // 2
        if _local_at(middle).replace(tzinfo=None) < whole:
            before = middle
        else:
            after = middle
    return _local_at(after)


def _local_at(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).astimezone()


def _is_http(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("http://", "https://"))


def _typed(ctx: typer.Context, param: str) -> bool:
    """Whether the value of ``param`` was typed as its option, not read from its variable
    (the environment or ``./.env``) or its default."""
    source = ctx.get_parameter_source(param)
    return source is not None and source.name == "COMMANDLINE"


class _Named(NamedTuple):
    """How a message names the ledger's URL and the key: the option that gave each, or its
    variable (the environment, ``./.env``), as a setting is named."""

    ledger: str = "--ledger"
    key: str = "--token"


_AS_OPTIONS = _Named()


def _names(ctx: typer.Context) -> _Named:
    """How the options of this command were given (:class:`_Named`)."""
    return _Named(
        ledger="--ledger" if _typed(ctx, "ledger") else "IMAGEGEN_LEDGER_URL",
        key="--token" if _typed(ctx, "token") else "IMAGEGEN_API_KEY",
    )


def _local(url: str | None, ctx: typer.Context, *, read_only: bool = True) -> Ledger | None:
    """The ledger database ``url`` names, which these commands only read (or prune): never
    made here, and, but to prune, opened read-only (a SQLite file this user may not write is
    read, and nothing is written to it). None when it is the setting's, or the default, and
    no generation has been recorded into it yet.

    Raises:
        InvalidRequest: ``--ledger`` names the ledger function, or a file that is not there
            (a typo, which would otherwise read as an empty history).
    """
    from imagegen.ledger import ledger_path, open_ledger

    if _is_http(url):  # export and prune work on the database itself
        name = _names(ctx).ledger
        raise InvalidRequest(
            f"{name}: export and prune read the ledger's database: give its postgresql:// or "
            "sqlite:/// URL or a path, not the ledger function's http(s):// URL",
            errors=[{"field": name.lstrip("-"), "message": "a database URL or path"}],
        )
    try:
        ledger = open_ledger(url, must_exist=True, read_only=read_only)
    except NotFound:
        if not _typed(ctx, "ledger"):
            return None  # the ledger generate records into: nothing recorded yet
        raise InvalidRequest(
            f"--ledger: {ledger_path(url)} does not exist",
            errors=[{"field": "ledger", "message": "does not exist"}],
        ) from None
    warn_newer_schema(ledger)
    return ledger


def _settings(ctx: typer.Context, ledger: str | None, **overrides: Any) -> Settings:
    """The settings, refused before anything is read as every command refuses them: a
    ledger URL that names no ledger (an unsupported scheme, a port out of range) is named
    ``--ledger`` where the option gave it, else by its variable."""
    return settings_from(ledger_url=ledger if _typed(ctx, "ledger") else None, **overrides)


def _checked_id(generation_id: str) -> str:
    """``generation_id`` when it is one; an id names a URL path and storage keys."""
    from imagegen.identity import GENERATION_ID_PATTERN, valid_generation_id

    if not valid_generation_id(generation_id):
        raise InvalidRequest(
            f"{generation_id!r} is not a generation id",
            errors=[{"field": "generation_id", "message": f"must match {GENERATION_ID_PATTERN}"}],
        )
    return generation_id


def _replayable(service: Any, request: Any, generation_id: str) -> None:
    """A recorded request these settings refuse (a model not served, a plugin not installed)
    would only fail again, as a new failed generation: a 409 instead, nothing recorded."""
    from imagegen.ledger.replay import NotReplayable

    try:
        service.enhance_stage.check_inputs(request, request.generation_id)
    except InvalidRequest as exc:
        fields = ", ".join(dict.fromkeys(e["field"] for e in exc.errors))
        raise NotReplayable(
            f"generation {generation_id!r} cannot be replayed here: its request is refused by"
            f" these settings ({fields})",
            errors=exc.errors,
        ) from None


def _renderable(settings: Settings, job: EnhancedPrompt, generation_id: str) -> None:
    """A recorded job that render refuses under these settings before it admits it (a model
    not served, a size outside its family's rules, a LoRA not configured: the render stage's
    own checks) would only fail there, as a new failed generation: refused as
    :func:`_replayable` refuses a request, before anything is recorded."""
    from imagegen.ledger.replay import NotReplayable
    from imagegen.modelspec import request_errors
    from imagegen.render._lora import check_loras  # imports no torch

    errors = request_errors(job.model, job.width, job.height, settings.served_models)
    if not errors:
        try:
            check_loras(settings, job.model, job.loras)
        except InvalidRequest as exc:
            errors = exc.errors
    if errors:
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise NotReplayable(
            f"generation {generation_id!r} cannot be replayed here: its recorded job is refused"
            f" by these settings ({fields})",
            errors=errors,
        )


def check_token(token: str | None, name: str = "--token") -> None:
    """Refuse a key that no header can carry: printable ASCII only.

    Args:
        name: What gave it, as the message names it: ``--token``, or ``IMAGEGEN_API_KEY``.

    Raises:
        InvalidRequest: naming ``name``; the key itself is never shown.
    """
    field = name.lstrip("-")
    if token is not None and not (token.isascii() and token.isprintable()):
        raise InvalidRequest(
            f"{name}: an API key is printable ASCII",
            errors=[{"field": field, "message": "not printable ASCII"}],
        )
    if token is not None and token != token.strip():
        # A header's value cannot end in a space (RFC 9110, section 5.5): httpx would refuse it
        # with the value in its message; one pasted with a space is said here, unshown.
        raise InvalidRequest(
            f"{name}: an API key has no spaces around it",
            errors=[{"field": field, "message": "spaces around it"}],
        )


def _api(
    url: str,
    method: str,
    path: str,
    token: str | None = None,
    *,
    shape: type[BaseModel],
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    query: dict[str, Any] | None = None,
    named: _Named = _AS_OPTIONS,
    **params: Any,
) -> dict[str, Any]:
    """The ledger API's answer to a request, as JSON (read as ``shape`` first), sent with
    ``headers`` and ``query`` and ``params`` (the query: a parameter named as a keyword, such
    as ``from``, goes in ``query``), waiting ``timeout`` seconds for each step. A message
    names the URL and the key as ``named`` says (the option, or the variable, that gave
    each).

    Raises:
        DependencyUnavailable: unreachable, a server error, or a success not in ``shape``'s
            shape (another server on that port, an older or newer ledger).
    """
    import httpx
    from pydantic import ValidationError

    from imagegen._redact import redact_url
    from imagegen.validation import field_errors

    check_token(token, named.key)
    ledger_as, key_as = named
    ledger_field = ledger_as.lstrip("-")
    query = {k: v for k, v in {**(query or {}), **params}.items() if v is not None}
    sent = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        if token and httpx.URL(url).userinfo:
            # httpx turns a URL's user and password into its own Authorization header, which
            # replaces the bearer key: the ledger would see a password, never the key.
            raise InvalidRequest(
                f"{ledger_as}: {redact_url(url)!r} holds a user or password and {key_as}"
                " is given; give the key alone",
                errors=[{"field": ledger_field, "message": f"a user or password beside {key_as}"}],
            )
        reply = httpx.request(
            method, url.rstrip("/") + path, params=query, headers=sent, timeout=timeout
        )
    # Neither is an HTTPError: the URL is wrong (a bad port, a host IDNA refuses), not the network.
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InvalidRequest(
            f"{ledger_as}: {redact_url(url)!r} is not a valid URL: {exc}",
            errors=[{"field": ledger_field, "message": "not a valid URL"}],
        ) from None
    except httpx.HTTPError as exc:  # a failure (exit 1), not the command's input
        # The URL as every message says it: a password in it is not shown.
        raise DependencyUnavailable(f"ledger {redact_url(url)} is unreachable: {exc}") from None
    try:
        body = reply.json()
    except ValueError:  # not the ledger function answering: a proxy's page, another server
        body = None
    said = body.get("message") if isinstance(body, dict) else None
    if reply.status_code >= 400 or not isinstance(body, dict | list):
        where = f"ledger {redact_url(url)} answered {reply.status_code}"
        if said or body is not None:  # the ledger's JSON: what it says, or its first line
            first = reply.text.strip().splitlines()[0][:200]
            answer = f"{where}: {said or first}"
        else:  # a proxy's page, another server: its status in words, never the page
            answer = f"{where} {httpx.codes.get_reason_phrase(reply.status_code)}".rstrip()
            if reply.status_code < 400:
                answer += ", but not as the ledger API (no JSON)"
        if reply.status_code == 404 and said:
            raise NotFound(said)
        if reply.status_code < 400 or reply.status_code >= 500 or reply.status_code == 429:
            raise DependencyUnavailable(answer)  # the ledger's trouble, or no ledger: exit 1
        raise InvalidRequest(answer)
    try:
        return shape.model_validate(body).model_dump(mode="json")
    except ValidationError as exc:
        wrong = field_errors(exc)[0]
        raise DependencyUnavailable(
            f"{redact_url(url)} answered {reply.status_code}, but not as the ledger API"
            f" ({wrong['field']}: {wrong['message']})"
        ) from None


@app.command()
def status(
    ctx: typer.Context,
    generation_id: Annotated[str, typer.Argument(help="The generation id.")],
    ledger: LedgerUrl = None,
    token: LedgerToken = None,
    as_json: AsJson = False,
) -> None:
    """Show one generation: status, timeline, image, error."""
    _checked_id(generation_id)
    _settings(ctx, ledger)
    if _is_http(ledger):
        from imagegen.ledger.models import GenerationDetail

        path = f"/generations/{generation_id}"
        body = _api(str(ledger), "GET", path, token, shape=GenerationDetail, named=_names(ctx))
    else:
        store = _local(ledger, ctx)
        found = None
        if store is not None:
            try:
                found = store.get(generation_id)
            finally:
                store.close()
        if found is None:
            raise NotFound(f"generation {generation_id!r} is not in the ledger")
        body = found.model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    from imagegen.cli._app import display_location

    # Each a line however narrow the terminal or wherever it is piped: an id, a path or a URL
    # is there to be copied whole. Every value as a terminal may show it: a prompt (an LLM's),
    # a path or an error may hold control characters.
    lines = [
        f"[bold]generation[/] {markup(body['generation_id'], one_line=True)}",
        f"[bold]status[/]     {markup(str(body['status']), one_line=True)}",
    ]
    if body.get("model"):
        seed = "" if body.get("seed") is None else f"  seed {body['seed']}"  # not drawn yet
        lines.append(f"[bold]model[/]      {markup(body['model'], one_line=True)}{seed}")
    if body.get("prompt"):
        lines.append(f"[bold]prompt[/]     {markup(body['prompt'])}")
    where = body.get("url") or (body.get("location") and display_location(body["location"]))
    if where:  # as generate shows it: a local image as its path
        lines.append(f"[bold]image[/]      {markup(where, one_line=True)}")
    if body.get("replay_of"):
        lines.append(f"[bold]replay of[/]  {markup(body['replay_of'], one_line=True)}")
    if body.get("error"):
        stage, message = body.get("failed_stage"), body["error"]["message"]
        lines.append(f"[bold red]error[/]      {markup(f'{stage}: {message}')}")
    for entry in body.get("timeline", []):
        gap = entry.get("seconds_since_previous")
        delta = f"+{gap:.2f}s" if gap is not None else ""
        kind = markup(str(entry["type"]).rsplit(".", 2)[-1], one_line=True)
        lines.append(f"  {markup(str(entry['time']), one_line=True)}  {kind:<10} {delta}")
    for line in lines:
        out.print(line, soft_wrap=True)


_MAX_PAGE = 500
"""The ledger's largest page (``imagegen.ledger._sql.MAX_PAGE``, not imported: ``--help`` would
load the library)."""


@app.command()
def history(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option(help="From this time: ISO 8601, 'today' or an age (2h, 7d).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (same forms).")] = None,
    state: Annotated[
        str | None,
        typer.Option("--status", help="Only this status: requested … persisted, failed."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=_MAX_PAGE, help="At most this many (newest first).")
    ] = 20,
    cursor: Annotated[
        str | None,
        typer.Option(help="The next page: the cursor the previous page named (same filters)."),
    ] = None,
    ledger: LedgerUrl = None,
    token: LedgerToken = None,
    as_json: AsJson = False,
) -> None:
    """List recent generations, newest first, at local times (as --since/--until read them)."""
    from imagegen.ledger.models import STATUS_RANK

    # An empty filter is refused, never read as none (every generation) nor as one that
    # nothing matches (an empty model).
    for option, value in (
        ("--since", since),
        ("--until", until),
        ("--model", model),
        ("--cursor", cursor),
    ):
        refuse_empty(option, value)
    if state is not None and state not in STATUS_RANK:
        raise InvalidRequest(
            f"--status must be one of {', '.join(STATUS_RANK)}",
            errors=[{"field": "status", "message": "unknown status"}],
        )
    start = parse_when(since, field="since") if since else None
    end = parse_when(until, field="until") if until else None
    _settings(ctx, ledger)
    if _is_http(ledger):
        from imagegen.ledger.models import GenerationPage

        page = _api(
            str(ledger),
            "GET",
            "/generations",
            token,
            shape=GenerationPage,
            # In UTC, as RFC 3339 writes it: a local offset may hold seconds (Africa/Monrovia's,
            # -00:44:30, until 1972), which RFC 3339 has no room for and the API refuses.
            since=start.astimezone(UTC).isoformat() if start else None,
            until=end.astimezone(UTC).isoformat() if end else None,
            status=state,
            model=model,
            limit=limit,
            cursor=cursor,
            named=_names(ctx),
        )
        items, next_cursor = page["items"], page.get("next_cursor")
    else:
        store = _local(ledger, ctx)
        if store is None:  # nothing recorded yet
            items, next_cursor = [], None
        else:
            try:
                found = store.history(
                    status=state,  # type: ignore[arg-type]  # checked above
                    since=start,
                    until=end,
                    model=model,
                    limit=limit,
                    cursor=cursor,
                )
            finally:
                store.close()
            items = [g.model_dump(mode="json") for g in found.items]
            next_cursor = found.next_cursor
            if found.unreadable:
                # The others are listed; ``status`` of one of these says what cannot be read.
                unreadable = printable(", ".join(found.unreadable), one_line=True)
                err.print(
                    f"imagegen: warning: ledger {printable(store.where, one_line=True)} has"
                    f" unreadable records, not listed: {unreadable} (`imagegen status ID` says"
                    " why)",
                    markup=False,
                    soft_wrap=True,
                )
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        _more(next_cursor)
        return
    from rich.table import Table

    # A line per generation. On a narrow terminal (under 100 columns) the time is shorter and
    # the model left out (``status`` shows it); the prompt takes what the other columns leave
    # (each pads a character a side), cut short with an ellipsis, never folded into fragments.
    narrow = out.width < _NARROW
    headers = ["created", "generation", "status"] + ([] if narrow else ["model"]) + ["prompt"]
    rows = []
    for item in items:
        # In this machine's time zone (TZ): the one --since and --until read a time in.
        at = datetime.fromisoformat(item["created_at"]).astimezone()
        created = at.strftime("%Y-%m-%d %H:%M:%S")
        row = [created[5:16] if narrow else created, item["generation_id"], item["status"]]
        if not narrow:
            row.append(item.get("model") or "")
        row.append(item.get("prompt") or item.get("original_prompt") or "")
        # A cell is one line: no control character moves the cursor or ends the line.
        rows.append([printable(str(cell), one_line=True) for cell in row])
    widths = [
        max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)
    ]
    # An id beyond 32 characters (up to 128) folds, as a model's beyond _MODEL_WIDTH does.
    widths[1] = 32
    if not narrow:
        widths[3] = min(widths[3], _MODEL_WIDTH)
    room = max(12, min(60, out.width - sum(widths[:-1]) - 2 * len(headers)))
    table = Table(box=None)
    for header in headers:
        if header == "generation":  # whole: an id is there to be copied into status or replay
            table.add_column(header, min_width=32, overflow="fold")
        elif header == "model":
            table.add_column(header, overflow="fold", max_width=_MODEL_WIDTH)
        else:
            table.add_column(header, no_wrap=True)
    for row in rows:
        prompt = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"
        table.add_row(*(markup(cell) for cell in row[:-1]), markup(prompt))
    out.print(table)
    _more(next_cursor)


def _more(next_cursor: str | None) -> None:
    """Say, after a page, that more generations follow and the cursor that lists them.

    On stderr, whatever the mode: ``--json`` stays the list it has always been, and a table
    piped on is the table alone. One line with a fixed prefix, for a script to take the cursor.
    """
    if next_cursor:
        cursor = printable(next_cursor, one_line=True)  # a served ledger's, shown as given
        err.print(f"imagegen: more: --cursor {cursor}", markup=False, soft_wrap=True)


_MODEL_WIDTH = 24
"""Characters of a model's id on one line of ``history``; a longer id folds."""
_NARROW = 100
"""Terminals narrower than this get ``history`` without its model column."""


@app.command()
def replay(
    ctx: typer.Context,
    generation_id: Annotated[str, typer.Argument(help="The generation to reproduce.")],
    start: Annotated[
        str,
        typer.Option(
            "--from", help="'enhanced': the recorded prompt again; 'requested': enhance again."
        ),
    ] = "enhanced",
    ledger: LedgerUrl = None,
    token: LedgerToken = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Storage: a directory or s3://… (a local ledger's replay)."
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="An http(s):// ledger's replay: the same key makes the same replay, once"
            " (default: a new key, named if the answer is lost).",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Generate again from the ledger's record, under a new id linked to the original."""
    from imagegen.ledger.replay import check_from

    origin = check_from(start)
    _checked_id(generation_id)
    if _is_http(ledger) and output is not None:
        # The ledger function sends the recorded event to its cluster's broker: the cluster
        # renders it into its own storage, which no option of this command chooses.
        raise InvalidRequest(
            "--output: a replay through the ledger function is rendered by its cluster, into"
            " the cluster's storage; --output applies to a replay from a local ledger",
            errors=[{"field": "output", "message": "not with an http(s):// ledger"}],
        )
    if not _is_http(ledger) and idempotency_key is not None:
        # A local replay runs here, to its end or its error: there is no lost answer to retry.
        raise InvalidRequest(
            "--idempotency-key: a replay from a local ledger runs here; the key applies to a"
            " replay through the ledger function (an http(s):// ledger)",
            errors=[{"field": "idempotency_key", "message": "only with an http(s):// ledger"}],
        )
    settings = _settings(ctx, ledger, storage_url=output)
    if _is_http(ledger):
        body = _replay_through(
            str(ledger), generation_id, origin, token, idempotency_key, _names(ctx)
        )
        typer.echo(json.dumps(body, indent=2) if as_json else body["generation_id"])
        return
    from imagegen.ledger.replay import replay_job, replay_request

    store = _local(ledger, ctx)
    if store is None:  # nothing recorded yet
        raise NotFound(f"generation {generation_id!r} is not in the ledger")
    try:
        now = datetime.now(UTC)
        job = replay_job(store, generation_id, enhanced_at=now) if origin == "enhanced" else None
        request = replay_request(store, generation_id) if origin == "requested" else None
    finally:
        store.close()
    if job is not None:
        _renderable(settings, job, generation_id)
    stopped_by: list[int] = []

    async def go() -> Any:
        import asyncio

        from imagegen.cli.generate import _render_and_finish, stored
        from imagegen.service import one_trace

        cancel_on_termination(stopped_by)  # recorded where it stopped, as generate's
        made: list[Any] = []
        async with make_service(settings) as service:
            await service.storage.check()  # before the render, as generate does
            with one_trace():  # the new generation's: from its first stage, enhance or render
                enhanced = job
                if request is not None:
                    _replayable(service, request, generation_id)
                    enhanced = await service.enhance_while_loading(request)
                else:
                    assert job is not None
                    if service.recorder is not None:
                        await service.recorder.emitted("enhance", job)
                assert enhanced is not None
                # An interrupt once the PNG is stored lets its record be written first, as
                # generate's does: never a PNG left behind a failed generation. The image is
                # then shown, as generate shows it, before the line that says it was stopped.
                try:
                    finished = await _render_and_finish(service, enhanced, persisted=made.append)
                except asyncio.CancelledError:
                    if made:
                        _show_replayed(made[0], generation_id, as_json, done=stored(service))
                    raise
                return *finished, stored(service)

    try:
        persisted, underived, done = run_async(go)
    except BaseException:
        if stopped_by:  # cancelled by SIGTERM or SIGHUP: 128 + its number, as generate's
            raise typer.Exit(128 + stopped_by[0]) from None
        raise
    from imagegen.cli.generate import warn_underived

    _show_replayed(persisted, generation_id, as_json, done=done)
    with output_after(done):
        warn_underived(underived)


def _show_replayed(persisted: Any, generation_id: str, as_json: bool, *, done: str) -> None:
    """Print the image a replay of ``generation_id`` made (``done``: as :func:`output_after`)."""
    from imagegen.cli._app import image_where

    with output_after(done):
        if as_json:
            typer.echo(json.dumps(persisted.model_dump(mode="json"), indent=2))
        else:
            where = markup(image_where(persisted))
            out.print(f"[bold green]image[/]      {where}", soft_wrap=True)
            out.print(
                f"[bold]generation[/] {persisted.generation_id} (replay of {generation_id})",
                soft_wrap=True,
            )
            out.print(f"[bold]sha256[/]     {persisted.sha256}", soft_wrap=True)


def _replay_through(
    ledger: str,
    generation_id: str,
    origin: str,
    token: str | None,
    key: str | None,
    named: _Named,
) -> dict[str, Any]:
    """The ledger function's answer to replaying ``generation_id``, asked with an
    ``Idempotency-Key`` (``key``, else a new one); ``named`` as :func:`_api` takes it.

    Every call is sent with a key: an answer lost (a timeout, or the ledger's 503 when the
    broker was slow to answer) may hide a replay the broker took, and only a retry with the
    same key sends that replay's event again (taken once) rather than a second replay, a
    second render on a GPU.

    Ctrl-C, SIGTERM and SIGHUP while it waits for the answer stop it (exit 130, 143, 129)
    in one line that names the key to retry with, as a lost answer's does: the replay may
    have been sent all the same.

    Raises:
        InvalidRequest: ``key`` is not 1-255 printable ASCII characters.
        DependencyUnavailable: as :func:`_api`, naming the key to retry with.
        typer.Exit: stopped by a signal, its line said.
    """
    import shlex
    import uuid

    from imagegen.ledger.api import ReplayAccepted
    from imagegen.ledger.api import _checked_key as checked_key  # the API's own rule

    if key is None:
        key = uuid.uuid4().hex
    else:
        try:
            checked_key(key)
        except InvalidRequest as exc:
            why = exc.errors[0]["message"]
            raise InvalidRequest(
                f"--idempotency-key: must be {why}",
                errors=[{"field": "idempotency_key", "message": why}],
            ) from None
    path = f"/generations/{generation_id}/replay"
    retry = f"imagegen replay {generation_id} --idempotency-key {shlex.quote(key)}"
    hint = (
        f"the replay may have been accepted: retry it with `{retry}` (with the same --from"
        " and --ledger), which replays it once"
    )
    try:
        with _signals_raised():
            return _api(
                ledger,
                "POST",
                path,
                token,
                shape=ReplayAccepted,
                headers={"Idempotency-Key": key},
                query={"from": origin},
                named=named,
            )
    except DependencyUnavailable as exc:
        raise DependencyUnavailable(f"{exc.message}; {hint}", retry_after=exc.retry_after) from None
    except _Signalled as stop:
        code = 128 + stop.signum
        exit_at_once(code)  # another signal while it is said: at once, as every command
        say_stopped(code, lambda said: _say_error(f"{said}; {hint}"))
        raise typer.Exit(code) from None


class _Signalled(BaseException):
    """A stop signal came (:func:`_signals_raised`): a BaseException, as KeyboardInterrupt
    is, so that no ``except Exception`` of a client library takes it for its own failure."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raised() -> Iterator[None]:
    """In the block, SIGINT, SIGTERM and SIGHUP raise :class:`_Signalled`, where the process
    would otherwise end without a word (SIGTERM's and SIGHUP's default) or with a line that
    cannot say what was under way (Ctrl-C's). A blocking read is interrupted by it: Python
    runs the handler and raises its exception rather than retrying (PEP 475).

    A signal the process was started ignoring (``nohup``, a supervisor) stays ignored, and
    SIGINT is taken over only from Python's own handler, as :func:`run_async` does; off the
    main thread nothing changes (signal handlers are the main thread's alone).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raised(signum: int, frame: object) -> None:
        raise _Signalled(signum)

    before: dict[int, Any] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # Windows has no SIGHUP
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN or handler is None:
            continue
        if name == "SIGINT" and handler is not signal.default_int_handler:
            continue
        before[signum] = handler
        signal.signal(signum, raised)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def _say_error(message: str) -> None:
    """``message`` as every error line is said, on stderr."""
    sys.stderr.write(f"imagegen: error: {printable(message)}\n")
    sys.stderr.flush()


ledger_app = typer.Typer(help="Maintain the ledger: export events, prune old history.")
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("export")
def export(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help="Events recorded from this time.")] = None,
    ledger: LedgerDatabase = None,
) -> None:
    """Write every recorded event to stdout as CloudEvents JSON lines."""
    start = parse_when(since, field="since") if since else None  # refused before it opens
    _settings(ctx, ledger)
    store = _local(ledger, ctx)
    if store is None:  # nothing recorded yet: no line
        return
    try:
        if isinstance(sys.stdout, io.TextIOWrapper):
            # UTF-8 whatever the locale's encoding: JSON exchanged between systems is UTF-8
            # (RFC 8259, section 8.1), as JSON Lines are, and a Latin-1 or ASCII stdout could
            # not write an emoji at all. The same stream, re-encoding, so a closed pipe or a
            # full disk is met and said as for any output.
            sys.stdout.reconfigure(encoding="utf-8", errors=sys.stdout.errors)
        store.export_jsonl(sys.stdout, since=start)
    finally:
        store.close()


@ledger_app.command("prune")
def prune(
    ctx: typer.Context,
    days: Annotated[
        int | None,
        typer.Option(min=0, help="Keep this many days (0: forever); default: the setting."),
    ] = None,
    ledger: LedgerDatabase = None,
) -> None:
    """Delete history older than the retention."""
    settings = _settings(ctx, ledger)
    keep = days if days is not None else settings.ledger_retention_days
    if keep == 0:
        out.print("retention is 0 (keep forever): nothing pruned")
        return
    try:
        datetime.now(UTC) - timedelta(days=keep)  # the cutoff prune computes
    except OverflowError:
        # Named as the user gave it: the option, or the setting (whose value is never shown).
        named = f"--days: {keep}" if days is not None else "IMAGEGEN_LEDGER_RETENTION_DAYS"
        raise InvalidRequest(f"{named} is too many days: no date is that far back") from None
    store = _local(ledger, ctx, read_only=False)
    if store is None:
        out.print("no generation recorded yet: nothing pruned")
        return
    try:
        deleted = store.prune(timedelta(days=keep))
    finally:
        store.close()
    out.print(", ".join(f"{n} {table}" for table, n in deleted.items()) + " deleted")
