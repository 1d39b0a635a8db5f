"""The Typer application every command registers on, and what the commands share."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from imagegen.ledger.recorder import Recorder
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

__all__ = ["AsJson", "app", "err", "make_service", "out", "run_async", "settings_from"]

app = typer.Typer(
    name="imagegen",
    help="Text to image: enhance → render → persist, in-process or as Knative functions.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def settings_from(**overrides: Any) -> Settings:
    """The settings from the environment, with the options the user gave (None: not given)."""
    from imagegen.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def run_async(coro_factory: Callable[[], Any]) -> Any:
    """Run the coroutine ``coro_factory()`` makes to completion; return its result."""
    return asyncio.run(coro_factory())


def make_service(settings: Settings) -> ImageGenService:
    """An in-process service, with traces and metrics set up for the CLI."""
    from imagegen.observability import setup_observability
    from imagegen.service import ImageGenService

    # Keep the terminal for results: the model libraries' notices only at ERROR, unless asked.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Traces and metrics go to a collector when OTEL_EXPORTER_OTLP_ENDPOINT says so; the
    # console stays the CLI's own.
    setup_observability("imagegen-cli", settings, logs=False)
    return ImageGenService(settings, recorder=_recorder(settings))


def _recorder(settings: Settings) -> Recorder | None:
    """What records the local history; None (and a warning) when the ledger cannot open."""
    from imagegen.errors import ImageGenError
    from imagegen.ledger import open_ledger
    from imagegen.ledger.recorder import Recorder

    url = settings.ledger_url.get_secret_value() if settings.ledger_url else None
    if url and url.startswith(("http://", "https://")):
        return None  # a cluster's ledger records the cluster's events
    try:
        return Recorder(open_ledger(url))
    except (ImageGenError, OSError) as exc:
        err.print(f"[yellow]warning:[/] history is not recorded: {exc}")
        return None
