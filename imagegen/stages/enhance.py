"""enhance: ``generation.requested`` → ``prompt.enhanced``: plugins, then the LLM (CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imagegen.events import DREAM_PING, GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.plugins import PluginSet
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings


async def _enhance(
    service: ImageGenService, request: GenerationRequest, call: Call
) -> EnhancedPrompt:
    return await service.enhance(request, call)


def _prepare(settings: Settings) -> dict[str, PluginSet]:
    # The plugin set, made before the function says ready: one the settings break (a name no
    # plugin has, an option or a setting a plugin refuses) would fail every request of a
    # ready process. Its plugins' modules load now, as the first request would load them;
    # nothing is reached over the network, and no table is built.
    from imagegen.plugins import PluginSet

    return {"plugins": PluginSet.from_settings(settings)}


async def _warm_up(service: ImageGenService) -> list[str]:
    # The stage and its Ollama client are made here, as a first request would make them, and
    # the plugins that can build their tables (the holiday calendars).
    return await service.enhance_stage.warm_up()


def _timeout(settings: Settings) -> float:
    # Every Ollama attempt may use its whole timeout; the rest is plugins and storage.
    return settings.ollama_timeout * (settings.ollama_retries + 1) + 30


STAGE = Stage(
    name="enhance",
    summary="Write the final prompt: plugins, then the LLM.",
    # A PingSource can only send its own type: a ping is a request with no prompt (dreaming).
    consumes=(GENERATION_REQUESTED, DREAM_PING),
    emits=PROMPT_ENHANCED,
    input_model=GenerationRequest,
    output_model=EnhancedPrompt,
    handler=_enhance,
    timeout=_timeout,
    starts_generations=True,
    prepare=_prepare,
    warm_up=_warm_up,
)
