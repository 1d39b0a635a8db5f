"""The ``imagegen`` command line: the whole chain on a laptop, and tools for the functions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from imagegen.errors import ImageGenError, InvalidRequest

try:  # recent typer releases carry their own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

if TYPE_CHECKING:
    from imagegen.models import EnhancedPrompt, PersistedImage
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="imagegen",
    help="Text to image: enhance → render → persist, in-process or as Knative functions.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

STAGES = ("enhance", "render", "persist", "deadletter")


def _settings(**overrides: Any) -> Settings:
    from imagegen.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


Model = Annotated[str | None, typer.Option("--model", "-m", help="Model id, local path or 'tiny'.")]
Output = Annotated[
    str | None, typer.Option("--output", "-o", help="Storage: a directory or s3://bucket/prefix.")
]
Seed = Annotated[
    int | None, typer.Option(help="Seed (0 to 4294967295); default: derived per generation.")
]
Width = Annotated[int, typer.Option(help="Width in pixels (256-2048, multiple of 16).")]
Height = Annotated[int, typer.Option(help="Height in pixels (256-2048, multiple of 16).")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps (1-50); default: per model.")]
Guidance = Annotated[float | None, typer.Option(help="Guidance scale (0-20); default: per model.")]
Plugins = Annotated[
    str | None,
    typer.Option("--plugins", help="Comma-separated plugins to run, in order ('' for none)."),
]
NoEnhance = Annotated[bool, typer.Option("--no-enhance", help="Plugins only; no LLM.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _request(
    prompt: str | None,
    *,
    model: str | None,
    seed: int | None,
    width: int,
    height: int,
    steps: int | None,
    guidance: float | None,
    plugins: str | None,
    no_enhance: bool,
) -> Any:
    from imagegen.models import GenerationRequest
    from imagegen.validation import parse_model

    data: dict[str, Any] = {
        "prompt": prompt,
        "model": model,
        "seed": seed,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "enhance": not no_enhance,
    }
    if plugins is not None:
        data["plugins"] = [p.strip() for p in plugins.split(",") if p.strip()]
    return parse_model(GenerationRequest, {k: v for k, v in data.items() if v is not None})


def _service(settings: Settings) -> ImageGenService:
    from imagegen.observability import setup_observability
    from imagegen.service import ImageGenService

    # Traces and metrics go to a collector when OTEL_EXPORTER_OTLP_ENDPOINT says so; the
    # console stays the CLI's own.
    setup_observability("imagegen-cli", settings, logs=False)
    return ImageGenService(settings)


def _report(enhanced: EnhancedPrompt, persisted: PersistedImage, as_json: bool) -> None:
    if as_json:
        body = {
            "image": persisted.model_dump(mode="json"),
            "prompt": enhanced.model_dump(mode="json"),
        }
        typer.echo(json.dumps(body, indent=2))
        return
    where = persisted.url or _display_location(persisted.location)
    out.print(f"[bold green]image[/]   {where}")
    out.print(f"[bold]seed[/]    {persisted.seed}")
    out.print(f"[bold]model[/]   {persisted.model}")
    note = " (template: the LLM was unavailable)" if enhanced.fallback else ""
    out.print(f"[bold]prompt[/]  {enhanced.prompt}{note}", soft_wrap=True, markup=False)


def _display_location(location: str) -> str:
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(location).path)
    return location


async def _generate_one(
    service: ImageGenService, request: Any, *, show_progress: bool
) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not show_progress:
        return await service.generate(request)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("enhancing", total=None)
        enhanced = await service.enhance(request)
        bar.update(task, description="denoising", total=enhanced.steps, completed=0)

        def progress(step: int, total: int) -> None:
            bar.update(task, completed=step, total=total)

        rendered = await service.render(enhanced, progress=progress)
        bar.update(task, description="persisting")
        return enhanced, await service.persist(rendered)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw; omit to dream one.")] = None,
    model: Model = None,
    seed: Seed = None,
    width: Width = 1024,
    height: Height = 1024,
    steps: Steps = None,
    guidance: Guidance = None,
    plugins: Plugins = None,
    no_enhance: NoEnhance = False,
    output: Output = None,
    as_json: AsJson = False,
) -> None:
    """Generate one image end to end, in this process."""
    request = _request(
        prompt,
        model=model,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        plugins=plugins,
        no_enhance=no_enhance,
    )
    settings = _settings(storage_url=output)

    async def go() -> tuple[Any, Any]:
        async with _service(settings) as service:
            return await _generate_one(
                service, request, show_progress=not as_json and err.is_terminal
            )

    enhanced, persisted = _run(go)
    _report(enhanced, persisted, as_json)


@app.command()
def loop(
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt for every image; omit to dream each.")
    ] = None,
    count: Annotated[int, typer.Option(help="Images to make; 0 = until stopped.")] = 0,
    interval: Annotated[float, typer.Option(help="Seconds between images.")] = 0.0,
    model: Model = None,
    width: Width = 1024,
    height: Height = 1024,
    steps: Steps = None,
    plugins: Plugins = None,
    no_enhance: NoEnhance = False,
    output: Output = None,
    as_json: AsJson = False,
) -> None:
    """Generate images continuously; Ctrl-C stops after the current image."""
    if count < 0 or interval < 0:
        raise InvalidRequest("--count and --interval must not be negative")
    request = _request(
        prompt,
        model=model,
        seed=None,
        width=width,
        height=height,
        steps=steps,
        guidance=None,
        plugins=plugins,
        no_enhance=no_enhance,
    )
    settings = _settings(storage_url=output)

    async def go() -> int:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        running.add_signal_handler(signal.SIGINT, stop.set)
        running.add_signal_handler(signal.SIGTERM, stop.set)
        made = 0
        async with _service(settings) as service:
            while not stop.is_set() and (count == 0 or made < count):
                enhanced, persisted = await _generate_one(
                    service, request, show_progress=not as_json and err.is_terminal
                )
                _report(enhanced, persisted, as_json)
                made += 1
                if interval and (count == 0 or made < count):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=interval)
        return made

    made = _run(go)
    if not as_json:
        err.print(f"made {made} image(s)")


@app.command(name="plugins")
def list_plugins(as_json: AsJson = False) -> None:
    """List the discovered prompt plugins and whether they are enabled."""
    from imagegen.plugins import PluginSet

    infos = PluginSet.from_settings(_settings()).describe()
    if as_json:
        typer.echo(json.dumps([_plain(i) for i in infos], indent=2))
        return
    table = Table("plugin", "enabled", "description", "from")
    for info in infos:
        row = _plain(info)
        table.add_row(
            str(row.get("name")),
            "yes" if row.get("enabled") else "no",
            str(row.get("description", "")),
            str(row.get("source") or row.get("module") or ""),
        )
    out.print(table)


def _plain(info: Any) -> dict[str, Any]:
    if hasattr(info, "model_dump"):
        return dict(info.model_dump(mode="json"))
    if hasattr(info, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(info)
    return dict(info)


@app.command()
def doctor() -> None:
    """Check torch and the device, Ollama, and storage, in one table."""
    settings = _settings()
    table = Table("check", "status", "detail")
    ok = True

    try:
        from imagegen.render.diffusers_backend import DiffusersBackend

        described = DiffusersBackend(settings).describe()
        table.add_row("torch", "[green]ok[/]", ", ".join(f"{k}={v}" for k, v in described.items()))
    except ImportError as exc:
        table.add_row("torch", "[yellow]missing[/]", f"install the 'render' extra ({exc.name})")
    except ImageGenError as exc:
        table.add_row("torch", "[red]error[/]", exc.message)

    async def checks() -> tuple[dict[str, Any], str | None]:
        service = _service(settings)
        try:
            ollama = await service.enhance_stage.check()
        except ImageGenError as exc:
            ollama = {"reachable": False, "error": exc.message}
        storage_error = None
        try:
            await service.storage.check()
        except ImageGenError as exc:
            storage_error = exc.message
        await service.aclose()
        return ollama, storage_error

    ollama, storage_error = _run(checks)
    reachable = bool(ollama.get("reachable"))
    detail = f"{settings.ollama_host}: " + json.dumps(
        {k: v for k, v in ollama.items() if k != "reachable"}
    )
    fallback = "" if reachable else " (template prompts will be used)"
    table.add_row("ollama", "[green]ok[/]" if reachable else "[yellow]down[/]", detail + fallback)
    if storage_error is None:
        table.add_row("storage", "[green]ok[/]", settings.storage_url)
    else:
        ok = False
        table.add_row("storage", "[red]error[/]", storage_error)
    out.print(table)
    if not ok:
        raise typer.Exit(1)


@app.command()
def serve(
    stage: Annotated[str, typer.Argument(help="enhance, render, persist or deadletter.")],
    port: Annotated[int, typer.Option(envvar="PORT", help="Port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    debug: Annotated[
        bool, typer.Option(help="Flask's development server instead of gunicorn.")
    ] = False,
) -> None:
    """Run one function locally, as it runs on Knative."""
    if stage not in STAGES:
        raise InvalidRequest(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    source = functions_dir() / f"{stage}.py"
    from functions_framework import create_app
    from functions_framework._http import create_server

    function_app = create_app(stage, str(source), "http")  # type: ignore[no-untyped-call]
    err.print(f"serving {stage} on http://{host}:{port}")
    create_server(function_app, debug).run(host, port)  # type: ignore[no-untyped-call]


def functions_dir() -> Path:
    """The ``functions/`` folder of this checkout or image."""
    import os

    configured = os.environ.get("IMAGEGEN_FUNCTIONS_DIR")
    candidates = [Path(configured)] if configured else []
    candidates += [Path(__file__).resolve().parents[1] / "functions", Path.cwd() / "functions"]
    for candidate in candidates:
        if (candidate / "_runtime.py").is_file():
            return candidate
    raise InvalidRequest("functions/ not found; run from a checkout or set IMAGEGEN_FUNCTIONS_DIR")


@app.command()
def send(
    event_type: Annotated[
        str,
        typer.Argument(
            metavar="TYPE",
            help="CloudEvents type, e.g. dev.orchestr8.imagegen.generation.requested.",
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="URL: a function or a broker ingress.")],
    data: Annotated[str, typer.Option("--data", help="Event data as JSON.")] = "{}",
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "/imagegen/cli",
    subject: Annotated[str | None, typer.Option(help="Subject: the generation id.")] = None,
    mode: Annotated[Literal["binary", "structured"], typer.Option(help="Content mode.")] = "binary",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 600.0,
) -> None:
    """Post a CloudEvent and print the reply."""
    import uuid

    import httpx
    from cloudevents.conversion import to_binary, to_structured
    from cloudevents.http import CloudEvent

    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise InvalidRequest(f"--data is not valid JSON: {exc}") from None
    attributes = {"type": event_type, "source": source, "id": uuid.uuid4().hex}
    if subject:
        attributes["subject"] = subject
    event = CloudEvent(attributes, payload)
    headers, body = (to_binary if mode == "binary" else to_structured)(event)
    try:
        reply = httpx.post(to, headers=headers, content=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ImageGenError(f"could not reach {to}: {exc}") from None
    ce = {k: v for k, v in reply.headers.items() if k.lower().startswith("ce-")}
    try:
        reply_body: Any = reply.json()
    except ValueError:
        reply_body = reply.text
    typer.echo(
        json.dumps({"status": reply.status_code, "attributes": ce, "data": reply_body}, indent=2)
    )
    if reply.status_code >= 400:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors are one readable line and a non-zero exit, never a traceback."""
    try:
        result = app(args=argv, standalone_mode=False)
    except click_exceptions.UsageError as exc:
        if isinstance(exc, getattr(click_exceptions, "NoArgsIsHelpError", ())):
            sys.exit(0)
        _fail(exc.format_message(), 2)
    except click_exceptions.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 1)
    except typer.Abort:
        _fail("aborted", 130)
    except InvalidRequest as exc:
        details = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
        _fail(exc.message + (f" ({details})" if details else ""), 2)
    except ImageGenError as exc:
        _fail(exc.message, 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if isinstance(result, int) and result:
        sys.exit(result)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"imagegen: error: {message}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
