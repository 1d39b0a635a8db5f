"""enhance: ``generation.requested`` → ``prompt.enhanced``: plugins, then the LLM (CPU)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from imagegen.events import DREAM_PING, GENERATION_REQUESTED, PROMPT_ENHANCED
from imagegen.models import EnhancedPrompt, GenerationRequest
from imagegen.stages import Call, Stage

if TYPE_CHECKING:
    from imagegen.plugins import PluginSet
    from imagegen.service import ImageGenService
    from imagegen.settings import Settings

logger = logging.getLogger("imagegen.enhance")

KNATIVE_TIMEOUT_SECONDS = 150
"""enhance's ``timeoutSeconds`` as ``knative/base`` ships it (a test keeps the two equal): past
it queue-proxy answers 504, and the Trigger, whose delivery ``timeout`` is above it, retries
while the first attempt still waits on Ollama."""

STORAGE_CALL_S = 5.0
"""One call of the prompt memo to storage, slow but answered: milliseconds as a rule; 5 s is
S3's ``connect_timeout``, one connection that does not open. A store that stalls (90 s a call,
docs/storage.md) outlasts any budget: the request then ends in the budget's retryable 503."""

STORAGE_ALLOWANCE = 2 * STORAGE_CALL_S
"""The memo's two calls of each request: ``recall`` before the plugins, ``remember`` after the
LLM (:class:`~imagegen.enhance.memo.EnhanceMemo`)."""


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

    plugins = PluginSet.from_settings(settings)
    _warn_past_knative(settings)
    return {"plugins": plugins}


async def _warm_up(service: ImageGenService) -> list[str]:
    # The stage and its Ollama client are made here, as a first request would make them, and
    # the plugins that can build their tables (the holiday calendars).
    return await service.enhance_stage.warm_up()


OLLAMA_BACKOFF = 0.5
"""The first wait between Ollama attempts (``imagegen.enhance.llm.DEFAULT_BACKOFF``)."""


def llm_deadline(settings: Settings) -> float:
    """Seconds one prompt's LLM calls may take: every attempt its whole timeout, and the waits
    between them, as ``OllamaEnhancer.deadline`` bounds a write (a test keeps the two equal).
    Counted here, not asked of the client: the enhance package loads the HTTP clients, which
    enhance's readiness does without."""
    attempts = settings.ollama_retries + 1
    waits = sum(min(OLLAMA_BACKOFF * 2**i, OLLAMA_BACKOFF * 8) for i in range(attempts - 1))
    return float(settings.ollama_timeout * attempts + waits)


def _spent(settings: Settings) -> tuple[float, float]:
    """The seconds the LLM and the plugins may take in one request, at most."""
    from imagegen.plugins.pluginset import DEFAULT_PLUGIN_TIMEOUT

    # 1. The LLM.
    llm = llm_deadline(settings)
    # 2. The plugins, one after another, each up to its limit: a request runs the enabled ones
    # or fewer (PluginSet.select refuses any other).
    plugins = len(dict.fromkeys(settings.plugins)) * DEFAULT_PLUGIN_TIMEOUT
    return llm, plugins


def _timeout(settings: Settings) -> float:
    # 3. Then the prompt memo's storage calls.
    return sum(_spent(settings)) + STORAGE_ALLOWANCE


def _warn_past_knative(settings: Settings) -> None:
    # Said once, as the process starts (prepare runs once a process): settings that are right
    # only where the manifests were raised with them, and fail requests where they were not.
    llm, plugins = _spent(settings)
    budget = llm + plugins + STORAGE_ALLOWANCE
    if budget < KNATIVE_TIMEOUT_SECONDS:
        return
    given = " and ".join(
        f"{settings.variable(name)}={getattr(settings, name):g}"
        for name in ("ollama_timeout", "ollama_retries")
    )
    logger.warning(
        "enhance's budget is %g s (%s: Ollama %g s; %s: plugins %g s; storage %g s), not under "
        "the %d s timeoutSeconds of the shipped manifests: Knative would answer 504 first and "
        "the broker retry while the attempt still waits on Ollama; raise the Service's "
        "timeoutSeconds and responseStartTimeoutSeconds and the Trigger's delivery timeout "
        "with them (docs/runbook.md)",
        budget,
        given,
        llm,
        settings.variable("plugins"),
        plugins,
        STORAGE_ALLOWANCE,
        KNATIVE_TIMEOUT_SECONDS,
    )


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
