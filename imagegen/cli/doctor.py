"""``imagegen doctor``: what works here, and what to do about what does not."""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, NamedTuple

import typer

from imagegen.cli._app import (
    AsJson,
    Verbose,
    app,
    make_service,
    markup,
    newer_schema_said,
    out,
    run_async,
    run_blocking,
    settings_from,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from imagegen.cli._ollama import Advice
    from imagegen.errors import ImageGenError
    from imagegen.settings import Settings
    from imagegen.storage import Storage

__all__ = ["Check", "doctor", "run_checks"]

_STYLE = {"ok": "green", "warning": "yellow", "error": "red"}


class Check(NamedTuple):
    """One row: what was checked, its status, one sentence, and the next step (may be empty)."""

    check: str
    status: str
    summary: str
    next_step: str


def run_checks(settings: Settings) -> list[Check]:
    """The settings' start-up warnings, the render back end, the model, Ollama, storage, the
    prompt plugins and the ledger, each as a :class:`Check`; never raises."""
    # What a function logs once as it starts: settings that work against each other here too.
    rows = [
        Check("settings", "warning", f"{warning}.", _SETTINGS_STEP)
        for warning in settings.start_up_warnings()
    ]
    render, installed = _render_check(settings)
    rows.append(render)
    if installed:  # torch is there: the model is checked, device or not
        rows.append(_model_check(settings))

    async def checks() -> tuple[Advice, str | None, Check]:
        from imagegen.cli._ollama import check_ollama
        from imagegen.errors import ImageGenError
        from imagegen.storage import LocalStorage, open_storage

        usable, unopened, local, store = settings, None, None, None
        try:
            # A URL that names no storage at all (ftp://) fails here.
            store = open_storage(settings)
            local = store.root if isinstance(store, LocalStorage) else None
        except ImageGenError as exc:
            # Its row says so; Ollama is still asked, by a service that never writes.
            usable, unopened = settings.model_copy(update={"storage_url": "."}), exc.message
        service = make_service(usable, record=False)  # the ledger has its own row
        try:
            ollama = await check_ollama(service)
            plugins = await _plugins_check(settings)
            if store is None:
                return ollama, unopened, plugins
            try:
                unmade = local is not None and not local.exists()
            except OSError as exc:  # ENAMETOOLONG: a name longer than the file system allows
                why = exc.strerror or type(exc).__name__
                return ollama, f"Local storage {local} cannot be looked up: {why}", plugins
            if local is not None and unmade:
                return ollama, _unmade_folder(local), plugins
            try:
                await _bounded(store).check()
            except ImageGenError as exc:
                return ollama, exc.message, plugins
            return ollama, None, plugins
        finally:
            await service.aclose()

    ollama, storage_error, plugins = run_async(checks)
    if ollama.status == "ok":
        rows.append(Check("ollama", "ok", f"{ollama.summary}.", ""))
    else:
        step = f"{ollama.next_step[0].upper()}{ollama.next_step[1:]}, or prompts use templates."
        rows.append(Check("ollama", ollama.status, f"{ollama.summary}.", step))
    rows.append(_storage_check(settings, storage_error))
    rows.append(plugins)
    rows.append(_ledger_check(settings))
    return rows


_SETTINGS_STEP = "Change the settings named, unless that is meant (docs/configuration.md)."


def _render_check(settings: Settings) -> tuple[Check, bool]:
    """The render row, and whether the render extra is installed and imports."""
    from imagegen.cli.tools import RENDER_EXTRA, not_installed
    from imagegen.errors import ImageGenError, first_line
    from imagegen.render._errors import INSTALL_HINT

    def uninstalled(name: str) -> tuple[Check, bool]:
        return Check(
            "render",
            "warning",
            f"{name} is not installed: this install enhances and persists only.",
            f"Install the render extra: {INSTALL_HINT}.",
        ), False

    if (missing := not_installed(*RENDER_EXTRA)) is not None:
        return uninstalled(missing)
    try:
        # torch and diffusers imported, and the device asked for, as render does it: off the
        # main thread, where a Ctrl-C stops doctor at once, as it stops any command.
        info = run_blocking(_describe, settings)
    except ImportError as exc:
        # A package the extra needs that is not there (transformers) is not installed; one
        # that is there and fails to import is a broken install, not a missing one.
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        name = (cause.name or "").partition(".")[0]
        if name and not_installed(name) is not None:
            return uninstalled(name)
        return Check(
            "render",
            "error",
            f"The render extra is installed but does not import: {first_line(cause)}.",
            "Reinstall the package it names (pip install --force-reinstall PACKAGE).",
        ), False
    except ImageGenError as exc:
        return Check("render", "error", exc.message, "Check IMAGEGEN_DEVICE."), True
    device = info.get("device", "")
    if device.startswith("unavailable"):
        # The reason names the setting, and the profile where that set it: not the variable
        # alone, which a user of IMAGEGEN_PROFILE=prod never set.
        why = device.removeprefix("unavailable: ")
        return Check("render", "error", f"{why}.", "Set IMAGEGEN_DEVICE=auto (or cpu)."), True
    summary = f"torch {info['torch']} renders on {device} ({info.get('dtype', '?')})."
    if unapplied := _fast_path_unapplied(settings, device):
        said, step = unapplied
        return Check("render", "warning", f"{summary} {said}.", step), True
    if device == "cpu":
        return Check(
            "render",
            "ok",
            summary,
            "Fine for `--model tiny`; FLUX wants a CUDA GPU (docs/deploy.md).",
        ), True
    return Check("render", "ok", summary, ""), True


def _describe(settings: Settings) -> dict[str, str]:
    """What the render back end says of itself here (torch's version, the device, the dtype);
    imports torch and diffusers."""
    from imagegen.render.diffusers_backend import DiffusersBackend

    return DiffusersBackend(settings).describe()


def _fast_path_unapplied(settings: Settings, device: str) -> tuple[str, str] | None:
    """The fast-path settings given that render does not apply on ``device``, as
    ``imagegen.render._fastpath.apply_fast_path`` decides (nothing off CUDA; neither fusing
    nor compiling where LoRAs are configured; fp8 below compute capability 8.9 or without
    torchao), said with the next step; None when each one given applies. Called once torch
    is imported (the render row's back end)."""
    import importlib.util

    fuse = (settings.render_fuse_qkv, f"{settings.variable('render_fuse_qkv')}=true")
    fp8 = (settings.render_fp8, f"{settings.variable('render_fp8')}=true")
    compile_ = (
        settings.render_compile != "off",
        f"{settings.variable('render_compile')}={settings.render_compile}",
    )
    if not device.startswith("cuda"):
        off = [said for wanted, said in (fuse, fp8, compile_) if wanted]
        if not off:
            return None
        return (
            f"{_listed(off)} {_is(off)} not applied on {device}: the fast path is CUDA's alone"
            " (docs/rendering.md)",
            "Unset them here, or render on a CUDA GPU.",
        )
    notes: list[tuple[str, str]] = []
    off = [said for wanted, said in (fuse, compile_) if wanted]
    if off and (settings.loras or settings.lora_dir):
        lora_vars = [
            settings.variable(name) for name in ("loras", "lora_dir") if getattr(settings, name)
        ]
        notes.append(
            (
                f"{_listed(off)} {_is(off)} not applied: LoRAs are configured"
                f" ({_listed(lora_vars)}), whose adapters fusing and compiling would defeat"
                " (docs/rendering.md)",
                "Unset them, or the LoRAs.",
            )
        )
    if settings.render_fp8:
        import torch

        from imagegen.render._fastpath import FP8_MIN_CAPABILITY

        capability = tuple(torch.cuda.get_device_capability(device))
        if capability < FP8_MIN_CAPABILITY:
            notes.append(
                (
                    f"{fp8[1]} is not applied: fp8 needs compute capability 8.9+, this GPU has"
                    f" {capability[0]}.{capability[1]} (docs/rendering.md)",
                    "Unset it, or render on an Ada or Hopper GPU.",
                )
            )
        elif importlib.util.find_spec("torchao") is None:
            notes.append(
                (
                    f"{fp8[1]} is not applied: torchao is not installed (docs/rendering.md)",
                    "Install it (pip install 'imagegen[fp8]'), or unset it.",
                )
            )
    if not notes:
        return None
    return ". ".join(n for n, _ in notes), " ".join(step for _, step in notes)


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _is(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _model_check(settings: Settings) -> Check:
    """Whether ``settings.model`` loads here without a download (the cache, a directory, or
    built offline): an image's first render otherwise fetches gigabytes, or fails offline. A
    snapshot or directory render cannot load (a pull cut short, a damaged file) is said as
    ``imagegen models list`` says it: incomplete."""
    from pathlib import Path

    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    from imagegen.errors import ImageGenError
    from imagegen.render._loading import hub_errors, hub_options, looks_like_path, revision_said
    from imagegen.render.pull import incomplete, needs_nothing

    model = settings.model
    local = Path(model).expanduser()
    if local.exists() or looks_like_path(model):
        if (local / "model_index.json").is_file():
            if why := incomplete(local):
                return Check(
                    "model",
                    "error",
                    f"Pipeline directory {model} is incomplete: {why}.",
                    "Copy the whole pipeline there, or point IMAGEGEN_MODEL at one.",
                )
            return Check("model", "ok", f"Model {model} is a pipeline directory.", "")
        return Check(
            "model",
            "error",
            f"IMAGEGEN_MODEL={model} is no diffusers pipeline directory (no model_index.json).",
            "Point IMAGEGEN_MODEL at one, or name a Hub model (imagegen models list).",
        )
    if needs_nothing(model) is not None:
        return Check("model", "ok", f"Model {model} is built here, random weights: noise.", "")
    options = hub_options(settings, model)
    what = f"model {model!r} at {revision_said(settings, model)}"
    try:
        # No valid Hub id is refused as render and `imagegen models pull` refuse it: no pull
        # would fetch it.
        with hub_errors(model, field="model", what=what):
            found = try_to_load_from_cache(
                model,
                "model_index.json",
                cache_dir=options["cache_dir"],
                revision=options["revision"],
            )
    except ImageGenError as exc:
        return Check(
            "model",
            "error",
            f"IMAGEGEN_MODEL: {exc.message}.",
            "Point IMAGEGEN_MODEL at a Hub model (org/name, imagegen models list) or a"
            " pipeline directory.",
        )
    if isinstance(found, str):
        # What render would fail to load, read from the files' headers (as `models list`).
        if why := incomplete(Path(found).parent):
            return Check(
                "model",
                "error",
                f"Model {model} is incomplete in the model cache: {why}.",
                f"Run `imagegen models pull {model}` to repair it.",
            )
        return Check("model", "ok", f"Model {model} is in the model cache.", "")
    if is_offline_mode():
        # Every render fails: the Hub is not asked (HF_HUB_OFFLINE, read by huggingface_hub).
        return Check(
            "model",
            "error",
            f"Model {model} is not in the model cache and HF_HUB_OFFLINE is set: every image"
            " fails.",
            "Run `imagegen models pull` where the Hub can be reached, or unset HF_HUB_OFFLINE.",
        )
    return Check(
        "model",
        "warning",
        f"Model {model} is not in the model cache: the first image downloads it, or fails offline.",
        "Run `imagegen models pull` first, or use `--model tiny` to try the chain.",
    )


_S3_READ_TIMEOUT = 10.0
"""How long the storage check waits for object storage's answer, asked once: not a
generation's three tries of thirty seconds each (an endpoint that takes connections and never
answers would keep doctor for over a minute and a half)."""


def _bounded(store: Storage) -> Storage:
    """``store`` to be checked: object storage asked once, within :data:`_S3_READ_TIMEOUT`."""
    import dataclasses

    from imagegen.storage import LocalStorage

    if isinstance(store, LocalStorage):
        return store
    from imagegen.storage.s3 import S3Storage

    if not isinstance(store, S3Storage):
        return store
    options = dataclasses.replace(
        store.options,
        connect_timeout=min(store.options.connect_timeout, 5.0),
        read_timeout=min(store.options.read_timeout, _S3_READ_TIMEOUT),
        max_attempts=1,
    )
    return S3Storage(store.bucket, store.prefix, options)


def _unmade_folder(root: Path) -> str | None:
    """Why images could not go into ``root``, a folder not made yet, found without making
    it (the first image does): the nearest folder above it that exists must be writable."""
    import os

    parent = next(p for p in root.parents if p.exists())  # the file system's root exists
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return None
    return f"Local storage {root} cannot be created under {parent}"


def _storage_check(settings: Settings, error: str | None) -> Check:
    from imagegen._redact import redact_url

    where = redact_url(settings.storage_url)
    if error is None:
        return Check("storage", "ok", f"Images are written to {where}.", "")
    return Check(
        "storage",
        "error",
        error if error.endswith(".") else f"{error}.",
        "Check IMAGEGEN_STORAGE_URL and the S3 settings (docs/storage.md).",
    )


async def _plugins_check(settings: Settings) -> Check:
    """The plugins the settings enable, as a generation enables them, and the options the
    settings give them: a name no plugin has, or an option refused, fails every generation."""
    from imagegen.cli.tools import refused_options
    from imagegen.errors import ConfigurationError, ImageGenError
    from imagegen.plugins import PluginSet

    try:
        plugin_set = PluginSet.from_settings(settings)
    except ImageGenError as exc:
        reasons = "; ".join(e["message"] for e in exc.errors) or exc.message
        # The options' refusal names its variable; the names' (InvalidRequest) does not.
        options = isinstance(exc, ConfigurationError) and exc.fields
        variable = exc.fields[0] if options else settings.variable("plugins")
        return Check("plugins", "error", f"{variable}: {reasons}.", _PLUGINS_STEP)
    refused = await refused_options(plugin_set)
    if refused:
        said = "; ".join(refused.values())
        return Check(
            "plugins", "error", f"{settings.variable('plugin_options')}: {said}.", _PLUGINS_STEP
        )
    names = ", ".join(plugin_set.names) or "none"
    summary = f"Prompt plugins enabled: {names}."
    if missing := _missing_loras(settings):
        return Check(
            "plugins",
            "warning",
            f"{summary} {' '.join(missing)}",
            "Mount or fix the LoRAs named, or unset the setting (docs/plugins.md).",
        )
    return Check("plugins", "ok", summary, "")


def _missing_loras(settings: Settings) -> list[str]:
    """A sentence for an ``IMAGEGEN_LORA_DIR`` that is not a directory here, and one for the
    ``IMAGEGEN_LORAS`` entries that name a path not there (as render's
    ``imagegen.render._lora.missing_loras`` finds them): the lora plugin draws nothing from
    the directory, saying so in the log at each request, and takes such an entry for a Hub
    id, which render then answers 503."""
    from pathlib import Path

    from imagegen.modelspec import looks_like_path

    said = []
    if settings.lora_dir is not None:
        variable = settings.variable("lora_dir")
        try:
            found = settings.lora_dir.expanduser().is_dir()
        except OSError as exc:  # ENAMETOOLONG, a folder on the way it may not search
            why = exc.strerror or type(exc).__name__
            said.append(f"{variable}={settings.lora_dir} cannot be looked up ({why}).")
        else:
            if not found:
                said.append(
                    f"{variable}={settings.lora_dir} is not a directory: the lora plugin draws"
                    " no LoRA from it."
                )
    missing = []
    for entry in settings.loras:
        if not looks_like_path(entry):
            continue  # a Hub id, not looked for
        try:
            there = Path(entry).expanduser().exists()
        except OSError:  # a name too long, a folder it may not search: not there for render
            there = False
        if not there:
            missing.append(entry)
    if missing:
        paths = ", ".join(missing)
        verb = "does" if len(missing) == 1 else "do"
        said.append(
            f"{settings.variable('loras')}: {paths} {verb} not exist here: a job that draws"
            " one fails at render (503, retried)."
        )
    return said


_PLUGINS_STEP = (
    "Check IMAGEGEN_PLUGINS and IMAGEGEN_PLUGIN_OPTIONS (imagegen plugins, docs/plugins.md)."
)


_LEDGER_WAIT = 10.0
"""Seconds the ledger check waits for a connection to a PostgreSQL ledger."""


def _ledger_check(settings: Settings) -> Check:
    """Whether the local history can be recorded and read, checked without changing it: a
    ledger not yet made is not made, and its schema is not migrated (the first image, or the
    ledger function, does both); an ``http(s)://`` ledger is asked for one generation."""
    import os

    from imagegen.errors import ImageGenError
    from imagegen.ledger import backend, ledger_path
    from imagegen.ledger.store import open_unmigrated

    url = settings.ledger_url.get_secret_value() if settings.ledger_url else None
    if url and url.startswith(("http://", "https://")):
        return _http_ledger_check(url)
    try:
        postgres = backend(url) == "postgres"
    except ImageGenError:  # an unsupported scheme: said below, as a file's error
        postgres = False
    if postgres:
        step = "Check IMAGEGEN_LEDGER_URL, and that the database server runs (docs/ledger.md)."
    else:
        step = (
            "Check IMAGEGEN_LEDGER_URL, or move the file aside for a new history (docs/ledger.md)."
        )
    try:
        path = ledger_path(url)
        try:
            missing = path is not None and not path.exists()
        except OSError as exc:  # ENAMETOOLONG: a name longer than the file system allows
            why = exc.strerror or type(exc).__name__
            return Check("ledger", "error", f"Ledger {path} cannot be looked up: {why}.", step)
        if path is not None and missing:
            parent = next(p for p in path.parents if p.exists())  # the root exists
            if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
                return Check(
                    "ledger", "error", f"Ledger {path} cannot be created under {parent}.", step
                )
            return Check("ledger", "ok", f"History goes to {path} (made by the first image).", "")
        ledger, pending = open_unmigrated(url, timeout=_LEDGER_WAIT)
        try:
            # A damaged file opens, and fails only when it is read: the latest page is read
            # (where the schema is this release's: a pending migration's columns are missing).
            page = ledger.history(limit=50) if pending == 0 else None
        finally:
            ledger.close()
    except ImageGenError as exc:
        message = exc.message
        return Check("ledger", "error", message if message.endswith(".") else f"{message}.", step)
    where = path if path is not None else "the ledger database"
    if (newer := newer_schema_said(ledger)) is not None:
        return Check("ledger", "warning", f"The {newer}.", "Upgrade imagegen (docs/ledger.md).")
    if page is None:
        what = "migration" if pending == 1 else "migrations"
        applier = "the ledger function" if postgres else "the first image"
        return Check(
            "ledger",
            "warning",
            f"Ledger {where} has {pending} schema {what} pending: applied by {applier}, which"
            " records into it.",
            "Nothing to do unless an older imagegen shares the ledger: upgrade it with this one"
            " (docs/ledger.md).",
        )
    if page.unreadable:
        ids = ", ".join(page.unreadable)
        return Check("ledger", "warning", f"Ledger {where} has unreadable records: {ids}.", step)
    return Check("ledger", "ok", f"History is recorded in {where}.", "")


def _http_ledger_check(url: str) -> Check:
    """The ledger function at ``url``, asked for its latest generation as ``imagegen history``
    asks it (the same client, with ``IMAGEGEN_API_KEY``): unreachable, or the key refused,
    every command that reads it fails."""
    from imagegen._redact import redact_url
    from imagegen.cli.history import _api, _Named, _or_dotenv
    from imagegen.errors import ImageGenError, InvalidRequest
    from imagegen.ledger.models import GenerationPage

    where = redact_url(url)
    step = "Check IMAGEGEN_LEDGER_URL, and that the ledger function runs (docs/ledger.md)."
    try:
        token = _or_dotenv("IMAGEGEN_API_KEY")(os.environ.get("IMAGEGEN_API_KEY") or None)
        _api(
            url,
            "GET",
            "/generations",
            token,
            shape=GenerationPage,
            timeout=_LEDGER_WAIT,
            named=_Named(ledger="IMAGEGEN_LEDGER_URL", key="IMAGEGEN_API_KEY"),
            limit=1,
        )
    except InvalidRequest as exc:
        # The key missing or refused (401, 403): its value is never said.
        said = exc.message.replace(url, where).removeprefix(f"ledger {where} ")
        if said.startswith(("answered 401", "answered 403")):
            return Check(
                "ledger",
                "error",
                f"The ledger at {where} refused the request: {said}.",
                "Set IMAGEGEN_API_KEY to a key the ledger function accepts (docs/ledger.md).",
            )
        return Check("ledger", "error", f"The ledger at {where}: {said}.", step)
    except ImageGenError as exc:
        said = exc.message.replace(url, where)
        return Check("ledger", "error", said if said.endswith(".") else f"{said}.", step)
    return Check("ledger", "ok", f"The cluster's ledger at {where} keeps history.", "")


def _telemetry_check() -> Check | None:
    """An ``error`` row when the ``OTEL_*`` settings cannot work (a propagator not installed);
    None when they can."""
    from imagegen.errors import ConfigurationError
    from imagegen.observability import check_propagators

    try:
        check_propagators()
    except ConfigurationError as exc:
        return Check(
            "telemetry",
            "error",
            "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors) + ".",
            "Name installed ones (tracecontext,baggage by default), or install the package of"
            " the one named; other commands refuse it until then (docs/observability.md).",
        )
    return None


@contextlib.contextmanager
def _set_aside(check: Check | None) -> Iterator[None]:
    """The other checks as though ``OTEL_PROPAGATORS`` were unset, when its ``check`` failed:
    OpenTelemetry's API reads it as it is first imported, and a name it cannot load fails
    that import, wherever it comes (``opentelemetry/propagate/__init__.py``)."""
    if check is None:
        yield
        return
    saved = os.environ.pop("OTEL_PROPAGATORS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["OTEL_PROPAGATORS"] = saved


def _explained(exc: ImageGenError) -> str:
    """``exc`` as the error line says it (the reasons of a setting's refusal, never its value)."""
    from imagegen.errors import ConfigurationError, InvalidRequest
    from imagegen.settings import Settings

    if isinstance(exc, ConfigurationError):
        return exc.explained(
            lambda field: Settings.variable(field) if field in Settings.model_fields else field
        )
    if isinstance(exc, InvalidRequest):
        return exc.explained()
    return exc.message


@app.command()
def doctor(as_json: AsJson = False, verbose: Verbose = False) -> None:
    """Check rendering, the model, Ollama, storage, plugins and the ledger; say what to do."""
    from imagegen.errors import ImageGenError

    telemetry = _telemetry_check()
    with _set_aside(telemetry):
        try:
            settings = settings_from()
        except ImageGenError as exc:
            if as_json:
                # What a program reads says so too; the error line and exit status follow as
                # for any command (2: settings that cannot work).
                said = _explained(exc)
                said = said if said.endswith(".") else f"{said}."
                row = Check(
                    "settings", "error", said, "Fix the setting named (docs/configuration.md)."
                )
                typer.echo(json.dumps({"ok": False, "checks": [row._asdict()]}, indent=2))
            raise
        rows = run_checks(settings)
    if telemetry is not None:
        rows.append(telemetry)
    failed = any(row.status == "error" for row in rows)
    if as_json:
        body = {"ok": not failed, "checks": [row._asdict() for row in rows]}
        typer.echo(json.dumps(body, indent=2))
    else:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for row in rows:
            sentence = markup(
                row.summary + (f" {row.next_step}" if row.next_step else ""), one_line=True
            )
            status = f"[{_STYLE.get(row.status, 'bold')}]{row.status}[/]"
            table.add_row(status, f"[bold]{row.check}[/]", sentence)
        out.print(table)
    if failed:
        raise typer.Exit(1)
