"""``imagegen generate`` and ``imagegen loop``: the whole chain, in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from imagegen.cli._app import AsJson, app, err, make_service, out, run_async, settings_from
from imagegen.errors import InvalidRequest

if TYPE_CHECKING:
    from imagegen.models import EnhancedPrompt, PersistedImage
    from imagegen.service import ImageGenService

__all__ = ["generate", "loop"]

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
    out.print(f"[bold]prompt[/]  {escape(enhanced.prompt)}{note}", soft_wrap=True)


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
    settings = settings_from(storage_url=output)

    async def go() -> tuple[Any, Any]:
        async with make_service(settings) as service:
            return await _generate_one(
                service, request, show_progress=not as_json and err.is_terminal
            )

    enhanced, persisted = run_async(go)
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
    settings = settings_from(storage_url=output)

    async def go() -> int:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        running.add_signal_handler(signal.SIGINT, stop.set)
        running.add_signal_handler(signal.SIGTERM, stop.set)
        made = 0
        async with make_service(settings) as service:
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

    made = run_async(go)
    if not as_json:
        err.print(f"made {made} image(s)")
