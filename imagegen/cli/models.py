"""``imagegen models``: the model table, and the served models pulled into the model cache."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated

import typer

from imagegen.cli._app import (
    AsJson,
    app,
    err,
    markup,
    out,
    printable,
    run_blocking,
    settings_from,
)
from imagegen.errors import ImageGenError

if TYPE_CHECKING:
    from imagegen.settings import Settings

__all__ = ["list_models", "models_app", "pull"]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_NARROW = 100  # columns: under it, the table leaves "here" out

models_app = typer.Typer(
    help="The model table; the model cache that render loads from.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@models_app.command()
def pull(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Hub ids (default: the Hub models of IMAGEGEN_SERVED_MODELS)."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Download models, at their pinned revisions, into IMAGEGEN_MODEL_CACHE_DIR."""
    from imagegen.cli.tools import check_render_extra
    from imagegen.render.pull import check_name, hub_models, needs_nothing, pull

    settings = settings_from()
    check_render_extra()  # diffusers fetches the files, into the Hub client's cache
    wanted = models or hub_models(settings)
    for name in wanted:  # every name, before the first download
        check_name(name)
    # Named ones that need no download are skipped, as the default list leaves them out.
    for name, why in ((n, needs_nothing(n)) for n in wanted):
        if why is not None:
            (err if as_json else out).print(
                f"{name}: {why}, nothing to pull", markup=False, soft_wrap=True
            )
    fetched = [n for n in wanted if needs_nothing(n) is None]
    if fetched:
        import importlib

        # torch and diffusers, which the download imports, imported off the main thread, as
        # doctor imports them (run_blocking): a Ctrl-C meanwhile stops the command at once.
        run_blocking(importlib.import_module, "imagegen.render._loading")
    # Each in turn, each said as it ends: one that fails neither hides those pulled before it
    # nor stops those after it; the command fails at its end, with the last failure's line.
    pulled, failure = [], None
    for name in fetched:
        try:
            done = pull(name, settings)
        except ImageGenError as exc:
            if failure is not None:
                said = f"imagegen: error: {printable(failure.message)}"
                err.print(said, markup=False, soft_wrap=True)
            failure = exc
            continue
        pulled.append(done)
        if not as_json:
            revision = done.revision or "main (not pinned)"
            line = f"{done.model} @ {revision}: {done.size_bytes / 1e9:.1f} GB in {done.path}"
            out.print(line, markup=False)
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "model": p.model,
                        "revision": p.revision,
                        "path": str(p.path),
                        "size_bytes": p.size_bytes,
                    }
                    for p in pulled
                ],
                indent=2,
            )
        )
    if failure is not None:
        raise failure
    if not wanted and not as_json:
        out.print("no Hub models configured: nothing to pull", markup=False)


@models_app.command(name="list")
def list_models(as_json: AsJson = False) -> None:
    """The model table and every served model: family, licence, pinned revision, whether it
    is served here, and what this machine holds of it."""
    from imagegen.modelspec import MODELS, known_spec, spec_for

    settings = settings_from()
    # The table's models, then each served one it lacks by that name (a local directory, another
    # Hub id, a table id in another case), in the order served: everything render may load.
    names = [*MODELS, *(m for m in settings.served_models if m not in MODELS)]
    rows = []
    for name in names:
        spec = spec_for(name)
        rows.append(
            {
                "model": name,
                "family": spec.family.title,
                "served": name in settings.served_models,
                "revision": settings.revision_for(name),
                "licence": spec.licence,
                "in_table": known_spec(name) is not None,
                "here": _held_here(name, settings),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich import box
    from rich.table import Column, Table

    # The id is what a user types: whole, never cut to the terminal's width (the other
    # columns wrap instead). The revision as the Hub shows a commit, 12 digits; --json has all.
    # Under 100 columns "here" is left out (a sixth column would cut the family and licence to
    # a few letters each); --json has it.
    widest = max((len(str(row["model"])) for row in rows), default=5)
    narrow = out.width < _NARROW
    table = Table(
        Column("model", no_wrap=True, min_width=widest),
        "family",
        "served",
        Column("revision", no_wrap=True, min_width=12),
        "licence",
        *([] if narrow else ["here"]),
        box=box.SIMPLE_HEAD,
    )
    for row in rows:
        revision = str(row["revision"] or "-")
        # Not in the table, its licence is not known here: why is said instead.
        licence = str(row["licence"]) if row["in_table"] else "not in the table"
        # As written: "FLUX.2 [klein]" is no markup to rich.
        table.add_row(
            markup(str(row["model"]), one_line=True),
            markup(str(row["family"]), one_line=True),
            "yes" if row["served"] else "no",
            markup(revision[:12] if _COMMIT.fullmatch(revision) else revision, one_line=True),
            markup(licence, one_line=True),
            *([] if narrow else [markup(str(row["here"]), one_line=True)]),
        )
    out.print(table)


def _held_here(model: str, settings: Settings) -> str:
    """What this machine holds of ``model``, read from the disk alone (nothing fetched, no
    folder made): built offline, a pipeline directory, or its snapshot at the revision render
    loads in the model cache (``IMAGEGEN_MODEL_CACHE_DIR``, else the Hub client's own), whole
    or not; a Hub model's is "no render extra" in an install without it (no Hub client)."""
    from pathlib import Path

    from imagegen.modelspec import MODELS, looks_like_path

    if model in MODELS and MODELS[model].offline:
        return "built offline"
    local = Path(model).expanduser() if model else None
    if local is not None and local.exists():
        if (local / "model_index.json").is_file():
            return "directory"
        return "no pipeline"  # no model_index.json: render refuses it
    if looks_like_path(model):
        return "no directory"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # nothing here could have pulled it, nor could render load it
        return "no render extra"

    cache = settings.model_cache_dir
    try:
        found = try_to_load_from_cache(
            model,
            "model_index.json",
            cache_dir=str(cache) if cache is not None else None,
            revision=settings.revision_for(model),
        )
    except ValueError:  # no valid Hub id: render refuses it, naming the field
        return "no Hub id"
    if not isinstance(found, str):
        return "not cached"
    from imagegen.render.pull import incomplete

    # What render would fail to load (a pull cut short, a damaged file), read from the files'
    # headers: ``imagegen models pull`` repairs it.
    return "incomplete" if incomplete(Path(found).parent) else "cached"
