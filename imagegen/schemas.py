"""Export the JSON Schema of every event payload: ``python -m imagegen.schemas [DIR]``.

The files in ``schemas/`` are generated from :mod:`imagegen.models`; a test fails when they drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from imagegen.events import dataschema, event_models, short_name

__all__ = ["render_schemas", "write_schemas"]


def render_schemas() -> dict[str, str]:
    """File name → JSON text of each event's schema."""
    out: dict[str, str] = {}
    for event_type, model in event_models().items():
        schema: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": dataschema(event_type),
            **model.model_json_schema(mode="validation"),
        }
        schema["description"] = (
            f"Data of CloudEvents type {event_type}. " + str(schema.get("description", "")).strip()
        )
        out[f"{short_name(event_type)}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")
    for path in write_schemas(target):
        print(path)
