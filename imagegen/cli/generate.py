"""``imagegen generate`` and ``imagegen loop``: the whole chain, in this process."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from imagegen.cli._app import (
    AsJson,
    Verbose,
    app,
    cancel_on_termination,
    err,
    exit_at_once,
    image_where,
    make_service,
    markup,
    out,
    output_after,
    printable,
    refuse_empty,
    run_async,
    settings_from,
)
from imagegen.errors import InvalidRequest

if TYPE_CHECKING:
    from imagegen.models import EnhancedPrompt, PersistedImage
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = ["generate", "loop", "stored", "warn_underived"]

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
    width: int,
    height: int,
    steps: int | None,
    plugins: str | None,
    no_enhance: bool,
    seed: int | None = None,
    guidance: float | None = None,
) -> Any:
    from imagegen.models import GenerationRequest
    from imagegen.validation import parse_model

    refuse_empty("--model", model)  # not the default model, said so or not
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


def _as_json(enhanced: EnhancedPrompt, persisted: PersistedImage, indent: int | None = None) -> str:
    """What ``--json`` prints of one image: its record and the prompt it was made from."""
    body = {"image": persisted.model_dump(mode="json"), "prompt": enhanced.model_dump(mode="json")}
    return json.dumps(body, indent=indent)


def stored(service: ImageGenService) -> str:
    """What a failure to write the output says of the image it was to show: that it is
    stored, and where it is listed when this process records the history."""
    if service.recorder is None:  # a ledger function's URL, or a ledger that cannot open
        return "the image is stored"
    return "the image is stored: see `imagegen history`"


def _report(
    enhanced: EnhancedPrompt, persisted: PersistedImage, as_json: bool, *, done: str
) -> None:
    with output_after(done):
        if as_json:
            typer.echo(_as_json(enhanced, persisted, indent=2))
            return
        out.print(f"[bold green]image[/]   {markup(image_where(persisted))}", soft_wrap=True)
        out.print(f"[bold]prompt[/]  {markup(enhanced.prompt)}", soft_wrap=True)
        out.print(f"[bold]seed[/]    {persisted.seed}   [bold]model[/] {markup(persisted.model)}")


def _explain_skips(
    skipped: list[tuple[str, str]], said: set[tuple[str, str]] | None = None
) -> None:
    """One line for each plugin left out of the prompt (it failed, timed out, or returned what
    no prompt can take), naming it and why; with ``said``, each (plugin, why) once."""
    for name, why in dict.fromkeys(skipped):
        if said is not None:
            if (name, why) in said:
                continue
            said.add((name, why))
        err.print(
            f"[yellow]note[/]    plugin {markup(name)} skipped: {markup(why)}", soft_wrap=True
        )


async def _explain_fallback(service: ImageGenService) -> None:
    """The one line a newcomer sees when Ollama did not write the prompt: why, and what to do."""
    from imagegen.cli._ollama import check_ollama

    advice = await check_ollama(service)
    if advice.status == "ok":  # it answers now, but did not write this prompt
        reason = "Ollama did not answer usefully (--verbose shows why)"
    else:
        reason = f"{advice.summary} ({advice.next_step})"
    err.print(f"[yellow]note[/]    template prompt used: {markup(reason)}", soft_wrap=True)


def _open(persisted: PersistedImage) -> None:
    from imagegen.cli._viewer import open_in_viewer

    target = image_where(persisted)
    if target.startswith("s3://"):
        why: str | None = "it is in object storage; set IMAGEGEN_PUBLIC_BASE_URL for a URL"
    else:
        why = open_in_viewer(target)
    if why is not None:
        err.print(f"[yellow]note[/]    not opened: {markup(why)}", soft_wrap=True)


async def _render_and_finish(
    service: ImageGenService,
    enhanced: EnhancedPrompt,
    *,
    progress: Any = None,
    stored: Any = None,
    persisted: Callable[[PersistedImage], None] | None = None,
) -> tuple[PersistedImage, str | None]:
    """Render and persist ``enhanced``, then make its derivatives; an interrupt once the PNG
    is stored lets the image be persisted first, and ``persisted`` hears of it then
    (:meth:`~imagegen.service.ImageGenService.render_and_persist`).

    Returns the persisted image and, when its derivatives could not be made (a full disk),
    why: the PNG and its record are stored, so the image is made all the same.
    """
    image = await service.render_and_persist(
        enhanced, progress=progress, stored=stored, persisted=persisted
    )
    return await _derived(service, image)


async def _derived(
    service: ImageGenService, persisted: PersistedImage
) -> tuple[PersistedImage, str | None]:
    return persisted, await service.try_derive(persisted)


def warn_underived(why: str | None) -> None:
    """The one line that says an image's derivatives were not made, and why."""
    if why is not None:
        err.print(
            "[yellow]warning:[/] the thumbnail and WebP/AVIF derivatives were not made:"
            f" {markup(why)} (the image is stored)",
            soft_wrap=True,
        )


async def _generate_one(
    service: ImageGenService,
    request: Any,
    *,
    show_progress: bool,
    skipped: list[tuple[str, str]] | None = None,
    made: list[tuple[EnhancedPrompt, PersistedImage]] | None = None,
) -> tuple[Any, Any, str | None]:
    """One image, enhance to derive: one trace, as :meth:`ImageGenService.generate` makes;
    ``skipped`` gets the plugins left out of its prompt, and why; ``made`` gets the image
    and its prompt as soon as it is persisted: an interrupt after that (its PNG stored: the
    image is persisted first) leaves it made, and its caller knows it."""
    from imagegen.plugins import noting_skips
    from imagegen.service import one_trace

    with one_trace(), noting_skips() as noted:
        try:
            if not show_progress:
                enhanced = await service.enhance_while_loading(request)
                return enhanced, *await _render_and_finish(
                    service, enhanced, persisted=_noting(made, enhanced)
                )
            return await _with_progress(service, request, made)
        finally:
            if skipped is not None:
                skipped.extend(noted)


def _noting(
    made: list[tuple[EnhancedPrompt, PersistedImage]] | None, enhanced: EnhancedPrompt
) -> Callable[[PersistedImage], None] | None:
    """What puts a persisted image, with ``enhanced``, into ``made``."""
    if made is None:
        return None
    return lambda persisted: made.append((enhanced, persisted))


async def _with_progress(
    service: ImageGenService,
    request: Any,
    made: list[tuple[EnhancedPrompt, PersistedImage]] | None = None,
) -> tuple[Any, Any, str | None]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),  # none while their number is not known
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("enhancing", total=None, steps="")
        enhanced = await service.enhance_while_loading(request)
        bar.update(
            task,
            description="denoising",
            total=enhanced.steps,
            completed=0,
            steps=f"0/{enhanced.steps} steps",
        )

        def progress(step: int, total: int) -> None:
            bar.update(task, completed=step, total=total, steps=f"{step}/{total} steps")

        def stored() -> None:
            bar.update(task, description="persisting")

        return enhanced, *await _render_and_finish(
            service, enhanced, progress=progress, stored=stored, persisted=_noting(made, enhanced)
        )


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
    open_: Annotated[
        bool, typer.Option("--open", help="Show the image in the default viewer.")
    ] = False,
    as_json: AsJson = False,
    verbose: Verbose = False,
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
    stopped_by: list[int] = []

    async def go() -> tuple[Any, Any]:
        import asyncio

        cancel_on_termination(stopped_by)
        async with make_service(settings) as service:
            # Storage probed before a render whose image would have nowhere to go: the
            # service probes only local storage at start (ImageGenService.__aenter__).
            await service.storage.check()
            _check_device(settings)
            skipped: list[tuple[str, str]] = []
            made: list[tuple[EnhancedPrompt, PersistedImage]] = []
            try:
                enhanced, persisted, underived = await _generate_one(
                    service,
                    request,
                    show_progress=not as_json and err.is_terminal,
                    skipped=skipped,
                    made=made,
                )
            except asyncio.CancelledError:
                # Stopped once its PNG was stored: the image is persisted all the same, and
                # shown, before the line that says it was stopped.
                if made:
                    _report(*made[0], as_json, done=stored(service))
                raise
            _report(enhanced, persisted, as_json, done=stored(service))
            with output_after(stored(service)):
                warn_underived(underived)
                if not as_json:
                    _explain_skips(skipped)
            if enhanced.fallback and not as_json:
                await _explain_fallback(service)
            return enhanced, persisted

    try:
        _, persisted = run_async(go)
    except BaseException:
        if stopped_by:  # cancelled by the signal: its conventional status, 128 + its number
            raise typer.Exit(128 + stopped_by[0]) from None
        raise
    if open_:
        _open(persisted)


def _check_device(settings: Settings) -> None:
    """A device the settings name and this machine lacks (a ``prod`` profile on a laptop),
    said before the prompt is written rather than once it is."""
    if settings.device not in ("cuda", "mps"):
        return  # auto, cpu: always one to render on
    try:
        from imagegen.render.diffusers_backend import select_device
    except ImportError:
        return  # no render extra: render says what to install
    select_device(settings.device)


@app.command()
def loop(
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt for every image; omit to dream each.")
    ] = None,
    count: Annotated[int, typer.Option(help="Images to make; 0 = until stopped.")] = 0,
    interval: Annotated[float, typer.Option(help="Seconds between images.")] = 0.0,
    model: Model = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="First image's seed (0 to 4294967295), the next one's plus 1, wrapping to 0"
            " past the top; default: derived per generation."
        ),
    ] = None,
    width: Width = 1024,
    height: Height = 1024,
    steps: Steps = None,
    plugins: Plugins = None,
    no_enhance: NoEnhance = False,
    output: Output = None,
    as_json: AsJson = False,
    verbose: Verbose = False,
) -> None:
    """Generate images continuously, a line per image; Ctrl-C stops after the current one."""
    if count < 0:
        raise InvalidRequest(
            "--count must not be negative",
            errors=[{"field": "count", "message": "negative"}],
        )
    if not (math.isfinite(interval) and interval >= 0):  # NaN compares false with anything
        raise InvalidRequest(
            f"--interval must be a number of seconds, 0 or more, not {interval}",
            errors=[{"field": "interval", "message": "not a finite number, 0 or more"}],
        )
    request = _request(
        prompt,
        model=model,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        plugins=plugins,
        no_enhance=no_enhance,
    )
    settings = settings_from(storage_url=output)

    tally = _Tally()

    def next_request() -> Any:
        """The request of the next image: with ``--seed``, its seed, one more than the last."""
        from imagegen.models import MAX_SEED

        if seed is None:
            return request
        return request.model_copy(update={"seed": (seed + tally.made) % (MAX_SEED + 1)})

    stopped_by: list[int] = []
    waiting = False  # between images, for --interval: a Ctrl-C then stops at once

    async def go() -> int:
        import asyncio
        import signal

        nonlocal waiting

        stop = asyncio.Event()
        running = asyncio.get_running_loop()

        interrupt = signal.getsignal(signal.SIGINT)  # run_async's: it cancels this task

        def first_interrupt() -> None:
            # The next Ctrl-C is run_async's again: it stops the image under way too, and one
            # more ends the process at once. Two that came before the loop ran this once are
            # both queued here: the second is raised again, for that handler.
            running.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, interrupt)
            if stop.is_set():
                signal.raise_signal(signal.SIGINT)
                return
            if not as_json:
                # Written at once, past rich's buffer: a Ctrl-C while rich writes would leave
                # the line in it, to be written again with the next.
                said = (
                    "stopping" if waiting else "stopping after this image; Ctrl-C again to stop now"
                )
                sys.stderr.write(f"{said}\n")
                sys.stderr.flush()
            stop.set()

        task = asyncio.current_task()
        assert task is not None, "run as a task"

        def terminated(signum: int) -> None:
            # The first stops the loop after this image, as a first Ctrl-C does; another, or
            # one after a first Ctrl-C, stops the image under way too, recorded where it
            # stopped (generate's way).
            if stopped_by or stop.is_set():
                if not stopped_by:  # after a Ctrl-C: this one ends the process, its status
                    stopped_by.append(signum)
                exit_at_once(128 + stopped_by[0])  # one more: at once
                task.cancel()
                return
            stopped_by.append(signum)
            stop.set()

        # A signal the process was started ignoring (a job in the background of a script,
        # nohup) stays ignored, as for generate.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            running.add_signal_handler(signal.SIGINT, first_interrupt)
        for name in ("SIGTERM", "SIGHUP"):
            signum = getattr(signal, name, None)  # Windows has no SIGHUP
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                running.add_signal_handler(signum, terminated, signum)
        explained = False
        skips_said: set[tuple[str, str]] = set()  # each plugin's skip said once, not per image

        def made_one(enhanced: EnhancedPrompt, persisted: PersistedImage, seconds: float) -> None:
            """Count the image and print its line (its JSON object with --json)."""
            tally.add(seconds)
            with output_after(f"{tally.made} image(s) made and stored"):
                if as_json:
                    typer.echo(_as_json(enhanced, persisted))
                else:
                    line = tally.line(printable(image_where(persisted)), count)
                    out.print(line, soft_wrap=True, markup=False)

        async with make_service(settings) as service:
            await service.storage.check()  # before a render, as above
            _check_device(settings)
            while not stop.is_set() and (count == 0 or tally.made < count):
                started = time.perf_counter()
                skipped: list[tuple[str, str]] = []
                made: list[tuple[EnhancedPrompt, PersistedImage]] = []
                try:
                    enhanced, persisted, underived = await _generate_one(
                        service,
                        next_request(),
                        show_progress=not as_json and err.is_terminal,
                        skipped=skipped,
                        made=made,
                    )
                except asyncio.CancelledError:
                    # Stopped once its PNG was stored: the image is persisted all the same,
                    # so counted and shown as any other, before "made N image(s)".
                    if made:
                        made_one(*made[0], time.perf_counter() - started)
                    raise
                made_one(enhanced, persisted, time.perf_counter() - started)
                with output_after(f"{tally.made} image(s) made and stored"):
                    warn_underived(underived)
                    if not as_json:
                        _explain_skips(skipped, skips_said)
                    if enhanced.fallback and not explained and not as_json:
                        await _explain_fallback(service)
                        explained = True
                if interval and (count == 0 or tally.made < count):
                    waiting = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=interval)
                    waiting = False
        return tally.made

    try:
        run_async(go)
    except Exception:
        if tally.made and not as_json:  # what was made before the failure
            err.print(f"made {tally.made} image(s)")
        raise
    except BaseException:  # Ctrl-C a second time: what was made, then "interrupted"
        if not as_json:
            err.print(f"made {tally.made} image(s)")
        if stopped_by:  # a second SIGTERM or SIGHUP cancelled the image under way
            raise typer.Exit(128 + stopped_by[0]) from None
        raise
    if not as_json:
        err.print(f"made {tally.made} image(s)")
    if stopped_by:  # stopped by SIGTERM or SIGHUP: its conventional status, as generate's
        raise typer.Exit(128 + stopped_by[0])


class _Tally:
    """Images made so far and their average time, for ``loop``'s line per image."""

    def __init__(self) -> None:
        self.made = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.made += 1
        self.seconds += seconds

    def line(self, where: str, count: int) -> str:
        """``[3/10] output/....png  1.84 s/image`` (``[3]`` when the loop has no end)."""
        of = f"/{count}" if count else ""
        return f"[{self.made}{of}] {where}  {self.seconds / self.made:.2f} s/image"
