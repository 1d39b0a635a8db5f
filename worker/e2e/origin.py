"""The origin of the Worker's browser tests: moto's S3 server on loopback, filled by imagegen.

Images are made by the real persist and derive stages (records, derivatives) from small PNGs on
three days, one with a prompt that is an HTML script, one with a prompt of nearly 2,000
characters (the most a request may send). A stray HTML document is stored at an image key, as a
hostile or broken bucket could hold. Prints one JSON line with the endpoint and what was stored,
then serves until its standard input closes.

Run from the repository root: ``.venv/bin/python worker/e2e/origin.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imagegen.derive import DeriveStage
from imagegen.persist import PersistStage
from imagegen.settings import Settings
from imagegen.storage import open_storage
from tests.fakes.images import store_rendered
from tests.fakes.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server

BUCKET = "images"
PREFIX = "generated/"
SCRIPT_PROMPT = "<script>document.title='pwned';alert(1)</script> a fox & a hound"
LONG_PROMPT = " ".join(["a lighthouse"] * 150)
IMAGES = [
    ("older-1", datetime(2026, 11, 30, 9, tzinfo=UTC), "a lighthouse at dusk", (200, 120, 40)),
    ("fox-1", datetime(2026, 12, 1, 8, tzinfo=UTC), SCRIPT_PROMPT, (40, 120, 200)),
    ("moon-1", datetime(2026, 12, 1, 9, tzinfo=UTC), "two moons over a desert", (90, 200, 90)),
    ("sea-1", datetime(2026, 12, 1, 10, tzinfo=UTC), "a calm sea, seen from above", (20, 60, 160)),
    # A day with one long prompt beside a short one, in the same row of the grid.
    ("long-1", datetime(2026, 11, 29, 9, tzinfo=UTC), LONG_PROMPT, (160, 60, 20)),
    ("short-1", datetime(2026, 11, 29, 8, tzinfo=UTC), "a red door", (60, 160, 20)),
]


def png(color: tuple[int, int, int]) -> bytes:
    image = Image.new("RGB", (384, 256), color)
    for x in range(0, 384, 16):
        for y in range(0, 256, 16):
            if (x + y) // 16 % 2:
                image.putpixel((x, y), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def fill(s3: S3Server) -> list[dict[str, object]]:
    settings = Settings(
        storage_url=f"s3://{BUCKET}/{PREFIX.rstrip('/')}",
        s3_preset="minio",
        s3_endpoint_url=s3.endpoint,
        s3_access_key_id=ACCESS_KEY_ID,
        s3_secret_access_key=SECRET_ACCESS_KEY,
        derivative_widths=[128, 256],
    )
    storage = open_storage(settings)
    stage = PersistStage(settings, storage)
    derive = DeriveStage(settings, storage)
    persisted = []
    for generation_id, at, prompt, color in IMAGES:
        image = await store_rendered(storage, generation_id, at, png(color), prompt)
        record = await stage.run(image)
        await derive.run(record)
        persisted.append(record.model_dump(mode="json"))
    # A document where an image should be, stored with an HTML type.
    await storage.put(
        "2026/12/01/rogue-1.png",
        b"<html><script>document.title='pwned'</script></html>",
        content_type="text/html",
    )
    return persisted


def main() -> None:
    with S3Server() as s3:
        s3.create_bucket(BUCKET)
        persisted = asyncio.run(fill(s3))
        info = {
            "endpoint": s3.endpoint,
            "bucket": BUCKET,
            "prefix": PREFIX,
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            "persisted": persisted,
        }
        print(json.dumps(info), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
