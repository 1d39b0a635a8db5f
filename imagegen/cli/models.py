"""``imagegen models pull``: the configured models into the model cache, ahead of time."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imagegen.cli._app import AsJson, app, out, settings_from

__all__ = ["models_app"]

models_app = typer.Typer(help="The model cache that render loads from.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command()
def pull(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Hub ids (default: IMAGEGEN_MODEL and IMAGEGEN_ALLOWED_MODELS)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Download models into IMAGEGEN_MODEL_CACHE_DIR, skipping what is already there."""
    from imagegen.render.pull import hub_models, pull

    settings = settings_from()
    pulled = [pull(name, settings) for name in (models or hub_models(settings))]
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {"model": p.model, "path": str(p.path), "size_bytes": p.size_bytes}
                    for p in pulled
                ],
                indent=2,
            )
        )
        return
    for p in pulled:
        out.print(f"{p.model}: {p.size_bytes / 1e9:.1f} GB in {p.path}", markup=False)
    if not pulled:
        out.print("no Hub models configured: nothing to pull", markup=False)
