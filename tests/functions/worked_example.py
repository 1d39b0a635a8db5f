"""The process tests/functions/test_adding_a_stage.py starts: a stage added by one module.

    python tests/functions/worked_example.py STAGES_DIR FUNCTIONS_DIR STORE_DIR

``STAGES_DIR`` holds ``check.py`` (added to the stage package's path, as if it were in
``imagegen/stages/``) and ``FUNCTIONS_DIR`` its functions-framework target. Prints, as one line
of JSON, what the registry, the derived documents, the CLI and the served function make of it.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import imagegen.stages as stages

RENDERED = "dev.orchestr8.imagegen.image.rendered"


def _black_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64)).save(out, format="PNG")
    return out.getvalue()


async def _stored(store: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A rendered image and a blank one, stored as render leaves them; their claim checks."""
    from imagegen.storage import LocalStorage
    from tests.fakes.images import gradient_png, store_rendered

    storage = LocalStorage(str(store))
    when = datetime(2026, 12, 2, 12, tzinfo=UTC)
    size = (256, 256)
    good = await store_rendered(
        storage, "gen-good", when, gradient_png(64, 64), "a map", job_size=size
    )
    blank = await store_rendered(storage, "gen-blank", when, _black_png(), "black", job_size=size)
    return good.model_dump(mode="json"), blank.model_dump(mode="json")


def _derived() -> dict[str, Any]:
    """What the registry and everything derived from it say of the stages."""
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from imagegen.cli import app
    from imagegen.events import event_models
    from imagegen.models import ErrorInfo, GenerationFailed
    from imagegen.openapi import document
    from imagegen.schemas import render_schemas

    error = ErrorInfo(code="x", message="x", retryable=False)
    try:
        GenerationFailed(stage="upscale", error=error, failed_at=datetime.now(UTC))
        unknown_refused = False
    except ValidationError:
        unknown_refused = True
    failed_schema = GenerationFailed.model_json_schema()["properties"]["stage"]
    return {
        "names": list(stages.names()),
        "order": [s.name for s in stages.all_stages()],
        "event_models": {t: m.__name__ for t, m in event_models().items()},
        "schemas": sorted(render_schemas()),
        "openapi_paths": sorted(document(stages.get("check"))["paths"]),
        "failed_schema_enum": failed_schema["enum"],
        "failed_names_check": GenerationFailed(
            stage="check", error=error, failed_at=datetime.now(UTC)
        ).stage,
        "unknown_stage_refused": unknown_refused,
        "serve_help": CliRunner().invoke(app, ["serve", "--help"]).output,
    }


def _served(functions: Path, good: dict[str, Any], blank: dict[str, Any]) -> dict[str, Any]:
    """The stage served by functions-framework, driven over HTTP in this process."""
    import functions_framework
    import httpx

    app = functions_framework.create_app("check", str(functions / "check.py"))
    client = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://check.test")

    def deliver(data: dict[str, Any], gid: str, event_type: str = RENDERED) -> dict[str, Any]:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": f"e-{gid}",
            "ce-source": "/test/render",
            "ce-type": event_type,
            "ce-time": "2026-12-02T12:00:00Z",
            "ce-generationid": gid,
            "content-type": "application/json",
        }
        reply = client.post("/", content=json.dumps(data), headers=headers)
        return {
            "status": reply.status_code,
            "type": reply.headers.get("ce-type"),
            "json": reply.json(),
        }

    return {
        "ready": client.get("/readyz").json(),
        "good": deliver(good, "gen-good"),
        "blank": deliver(blank, "gen-blank"),
        "plain": client.post("/", json=good).status_code,
        "unknown_type": deliver(good, "gen-good", "dev.orchestr8.imagegen.image.persisted")[
            "status"
        ],
    }


def main() -> None:
    extra, functions, store = (Path(arg) for arg in sys.argv[1:4])
    stages.__path__.append(str(extra))  # before anything reads the registry
    sys.path.insert(0, str(Path.cwd() / "functions"))  # _adapter, as functions-framework finds it
    good, blank = asyncio.run(_stored(store))
    print(json.dumps({**_derived(), **_served(functions, good, blank), "good_input": good}))


if __name__ == "__main__":
    main()
