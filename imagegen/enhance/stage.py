"""The enhance stage: a :class:`GenerationRequest` in, an :class:`EnhancedPrompt` out.

Every render parameter is fixed here, the seed included, and the prompt is a function of the
request, its generation id and its time: a redelivered request yields the same job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from zoneinfo import ZoneInfo

from opentelemetry import trace

from imagegen.enhance._ollama import ollama
from imagegen.enhance._template import HOLIDAY_PLUGIN, compose, dream_countries, dream_subject
from imagegen.enhance.llm import DEFAULT_BACKOFF, OllamaEnhancer, answered, fallback_reason
from imagegen.errors import DependencyUnavailable, InvalidRequest
from imagegen.identity import (
    GENERATION_ID_PATTERN,
    request_time,
    stage_time,
    valid_generation_id,
)
from imagegen.models import (
    MAX_LORAS,
    Contribution,
    EnhancedPrompt,
    GenerationRequest,
    LoraHint,
    derive_seed,
)
from imagegen.modelspec import ModelFamily, family_for, request_errors
from imagegen.plugins import PluginSet
from imagegen.settings import Settings
from imagegen.telemetry import instruments, tracer

__all__ = ["EnhanceStage"]

logger = logging.getLogger("imagegen.enhance")


def _loras(contributions: Sequence[Contribution]) -> list[LoraHint]:
    """The plugins' LoRA hints as render takes them: each name and each path once, the first
    given kept, at most :data:`MAX_LORAS` (a plugin's hints beyond are left out, and said)."""
    found: dict[str, LoraHint] = {}
    paths: set[str] = set()
    for contribution in contributions:
        for hint in contribution.loras:
            if hint.name in found or hint.path in paths:
                continue
            if len(found) == MAX_LORAS:
                logger.warning(
                    "plugin %s: LoRA %s left out (a job applies at most %d)",
                    contribution.plugin,
                    hint.name,
                    MAX_LORAS,
                )
                continue
            found[hint.name] = hint
            paths.add(hint.path)
    return list(found.values())


class EnhanceStage:
    """Runs the plugins, then has the LLM write the prompt (or a template, if it cannot).

    Args:
        settings: Models, Ollama and fallback settings.
        plugins: The plugins this stage runs.
        client: An Ollama client to use instead of one made from the settings.
        backoff: Seconds before the first Ollama retry.
    """

    def __init__(
        self,
        settings: Settings,
        plugins: PluginSet,
        *,
        client: ollama.AsyncClient | None = None,
        backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.enhancer = OllamaEnhancer(settings, client=client, backoff=backoff)

    def check_inputs(self, request: GenerationRequest, generation_id: str) -> str:
        """The model the request renders with, after checking what the settings constrain.

        Raises:
            InvalidRequest: naming every offending field (``generation_id``, ``model`` when
                no render service serves it, ``width``/``height`` outside the model family's
                rules, ``plugins``, ``plugin_options`` naming no enabled plugin or an option
                its plugin does not declare).
        """
        errors: list[dict[str, str]] = []
        if not valid_generation_id(generation_id):
            errors.append(
                {"field": "generation_id", "message": "must match " + GENERATION_ID_PATTERN}
            )
        model = request.model if request.model is not None else self.settings.model
        served = self.settings.served_models
        errors.extend(request_errors(model, request.width, request.height, served))
        try:
            self.plugins.select(request.plugins)
        except InvalidRequest as exc:
            errors.extend(exc.errors)
        errors.extend(self.plugins.option_errors(request.plugin_options))
        if errors:
            fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
            raise InvalidRequest(f"invalid GenerationRequest: {fields}", errors=errors)
        return model

    async def run(
        self,
        request: GenerationRequest,
        *,
        generation_id: str,
        now: datetime | None = None,
        keep: Callable[[EnhancedPrompt], Awaitable[EnhancedPrompt]] | None = None,
    ) -> EnhancedPrompt:
        """Enhance ``request`` into a render job.

        Args:
            request: What to draw.
            generation_id: The generation's id; the seed derives from it when the request
                gives none.
            now: The request's time when ``request.requested_at`` is unset (e.g. the event's
                time); default the current time.
            keep: Keeps the job written here and returns the generation's job: this one, or
                one another delivery kept first (:meth:`EnhanceMemo.remember`), which is then
                returned instead, and this one is neither counted (a fallback) nor logged
                as written.

        Raises:
            InvalidRequest: the request names a model that is not served, a size its family
                cannot render, or a plugin or plugin option that is not allowed.
            DependencyUnavailable: Ollama failed and ``settings.enhance_fallback`` is off.
        """
        # 1. Check inputs
        model = self.check_inputs(request, generation_id)
        spec = family_for(model)
        seed = request.seed if request.seed is not None else derive_seed(generation_id)
        requested_at = request_time(request.requested_at, now)

        # 2. The subject: the caller's, or the template's dream, from the request's time in the
        # zone the plugins read it in, in the hemisphere of the countries the holiday plugin
        # reads.
        subject = request.prompt
        if not subject:
            zone = ZoneInfo(request.timezone or self.settings.timezone)
            countries = await self._dream_countries(request)
            subject = dream_subject(seed, requested_at.astimezone(zone), countries)

        # 3. Run the plugins
        contributions = await self._contributions(request, generation_id, seed, requested_at)

        # 4. Write the prompt
        prompt, enhancer, fallback = await self._write(
            request, generation_id, subject, contributions, seed, spec
        )

        # 5. Fix every render parameter
        job = EnhancedPrompt(
            generation_id=generation_id,
            prompt=prompt,
            original_prompt=request.prompt,
            dreamed=request.prompt is None,
            fallback=fallback is not None,
            enhancer=enhancer,
            contributions=contributions,
            loras=_loras(contributions),
            model=model,
            width=request.width,
            height=request.height,
            steps=request.steps or spec.default_steps,
            guidance=spec.default_guidance if request.guidance is None else request.guidance,
            seed=seed,
            requested_at=requested_at,
            enhanced_at=stage_time(),  # kept in the memo with the prompt: said alike
            metadata=request.metadata,
            replay_of=request.replay_of,
        )

        # 6. Keep it, unless another delivery kept its own first: that one is the answer
        kept = job if keep is None else await keep(job)
        if kept is not job:
            logger.info("enhanced %s: answered from the kept prompt", generation_id)
            return kept
        if fallback is not None:
            instruments().enhance_fallbacks.add(1, {"reason": fallback})
            trace.get_current_span().add_event("imagegen.enhance.fallback", {"reason": fallback})
        self._log(job)
        return job

    async def _dream_countries(self, request: GenerationRequest) -> list[str]:
        """The countries the holiday plugin reads for ``request``, as it reads them: canonical,
        those its library does not list left out (``AU,XX`` is Australia's hemisphere), where
        the plugin says (``known_countries``); as given where it does not, or cannot."""
        holiday = self.plugins.options_for(HOLIDAY_PLUGIN, request.plugin_options)
        countries = dream_countries(self.settings.holiday_countries, holiday)
        if HOLIDAY_PLUGIN not in self.plugins.names:  # disabled: never loaded for a dream
            return countries
        try:
            known = getattr(self.plugins.get(HOLIDAY_PLUGIN), "known_countries", None)
            if known is not None:
                return list(await known(countries))
        except Exception as exc:  # a plugin's own code: the dream goes on without it
            logger.debug("holiday plugin's countries not read: %s: %s", type(exc).__name__, exc)
        return countries

    async def _contributions(
        self, request: GenerationRequest, generation_id: str, seed: int, requested_at: datetime
    ) -> list[Contribution]:
        """What the plugins the request selects contribute, in order."""
        with tracer().start_as_current_span("imagegen.plugins") as span:
            span.set_attribute("imagegen.plugins", self.plugins.select(request.plugins))
            contributions = await self.plugins.run(
                generation_id=generation_id,
                seed=seed,
                now=requested_at,
                prompt=request.prompt,
                timezone=request.timezone,
                options=request.plugin_options,
                selection=request.plugins,
            )
            span.set_attribute("imagegen.plugins.contributed", [c.plugin for c in contributions])
        return contributions

    async def _write(
        self,
        request: GenerationRequest,
        generation_id: str,
        subject: str,
        contributions: list[Contribution],
        seed: int,
        spec: ModelFamily,
    ) -> tuple[str, str, str | None]:
        """(prompt, enhancer, why the template stands in for the LLM or None) for ``request``;
        the template writes ``subject`` (the caller's prompt, or its dream) and the plugins'.

        A prompt the LLM did not write is logged here, once: a warning with its cause, or, for
        an open circuit, a debug line (the opening was the warning; the fallbacks are counted).
        """
        if not request.enhance:
            enhancer = "passthrough" if request.prompt else "template"
            return compose(subject, contributions, spec), enhancer, None
        try:
            text = await self.enhancer.write(
                prompt=request.prompt, contributions=contributions, seed=seed, spec=spec
            )
        except DependencyUnavailable as exc:
            # Without the fallback, only Ollama's absence is a 503: a reply that holds no
            # usable prompt is an answer, and a redelivery, sampled with the same seeds, would
            # get the same one. That request takes the template, fallback or not.
            if not self.settings.enhance_fallback and not answered(exc.__cause__):
                raise
            reason = fallback_reason(exc)
            if answered(exc.__cause__):
                why = f"the LLM's reply holds no usable prompt ({reason}: {exc.message})"
            else:
                why = f"the LLM is unavailable ({reason}: {exc.message})"
            # While the circuit is open every request lands here: a warning each would flood
            # the log during an outage that one warning (the opening) already reported.
            level = logging.DEBUG if reason == "circuit_open" else logging.WARNING
            logger.log(
                level,
                "enhance: %s; using the template prompt",
                why,
                extra={"generation_id": generation_id},
            )
            return compose(subject, contributions, spec), "template", reason
        return text, self.enhancer.name, None

    def _log(self, job: EnhancedPrompt) -> None:
        extra = f" prompt={job.prompt!r}" if self.settings.log_prompts else ""
        logger.info(
            "enhanced %s: enhancer=%s fallback=%s dreamed=%s plugins=%s loras=%s%s",
            job.generation_id,
            job.enhancer,
            job.fallback,
            job.dreamed,
            ",".join(c.plugin for c in job.contributions) or "-",
            ",".join(h.name for h in job.loras) or "-",
            extra,
        )

    async def check(self) -> dict[str, object]:
        """Ollama's state (reachable, models, whether the configured one is pulled)."""
        info = await self.enhancer.check()
        info["plugins"] = list(self.plugins.names)
        return info

    async def warm_up(self) -> list[str]:
        """Warm the plugins that can (:meth:`PluginSet.warm_up`), ask Ollama for its models,
        and have it load ours.

        The question (``GET /api/tags``, as :meth:`check` asks it) opens the connection the
        first prompt will use, and the log says once whether prompts will come from the LLM or
        from the template. Where Ollama has the model, it loads it now
        (:meth:`OllamaEnhancer.load`), so the first prompt does not wait for it, unless
        ``ollama_keep_alive`` is zero. Returns the names of the plugins warmed.
        """
        warmed = await self.plugins.warm_up()
        info = await self.enhancer.check()
        host, model = info["host"], info["model"]
        meanwhile = (
            "prompts come from the template"
            if self.settings.enhance_fallback
            else "requests are answered 503"  # IMAGEGEN_ENHANCE_FALLBACK=false
        )
        if not info["reachable"]:
            logger.warning(
                "Ollama at %s does not answer (%s): %s until it does",
                host,
                info.get("error"),
                meanwhile,
            )
            # Known down: the first prompts need not each wait for its retries to say so again.
            self.enhancer.breaker.trip("Ollama did not answer the warm-up")
        elif not info["model_available"]:
            logger.warning(
                "Ollama at %s has no model %s: %s until it is pulled", host, model, meanwhile
            )
        elif not self.enhancer.keeps_model_loaded:
            logger.info("Ollama at %s has %s (unloaded after each prompt)", host, model)
        else:
            try:
                took = await self.enhancer.load()
            except DependencyUnavailable as exc:
                logger.warning("%s; the first prompt waits for it", exc.message)
            else:
                logger.info("Ollama at %s has %s, loaded in %.1f s", host, model, took)
        return warmed

    async def aclose(self) -> None:
        """Release the Ollama connections and what the plugins hold."""
        await self.enhancer.aclose()
        await self.plugins.aclose()
