"""The ``first-image`` row's child process: one generation's wait for its prompt and model.

    python benchmarks/_first_image.py sequential|overlapped STORAGE OLLAMA_HOST

Prints the seconds from the request to a written prompt and a loaded model, in a fresh
process (the first image of a ``imagegen generate`` or ``loop``): ``sequential`` enhances,
then loads; ``overlapped`` is :meth:`ImageGenService.enhance_while_loading`.
"""

from __future__ import annotations

import asyncio
import sys
import time

from imagegen import GenerationRequest, ImageGenService, Settings


async def main(mode: str, storage: str, ollama_host: str) -> float:
    settings = Settings(model="tiny", device="cpu", storage_url=storage, ollama_host=ollama_host)
    async with ImageGenService(settings) as service:
        request = GenerationRequest(prompt="a lantern in the fog", model="tiny")
        started = time.perf_counter()
        if mode == "overlapped":
            job = await service.enhance_while_loading(request)
        else:
            job = await service.enhance(request)
            await service.render_stage.load(job.model)
        assert service.render_stage.is_loaded(job.model)
        return time.perf_counter() - started


if __name__ == "__main__":
    print(asyncio.run(main(*sys.argv[1:4])))
