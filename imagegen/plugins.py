"""Prompt plugins: the contract, discovery through entry points, and the runner.

A plugin adds a fragment (and structured data, and LoRA hints) to a generation's prompt. Third-
party packages ship plugins by declaring an entry point in the group ``imagegen.plugins``::

    [project.entry-points."imagegen.plugins"]
    weather = "my_package.weather:WeatherPlugin"

The entry point resolves to a factory called as ``factory(settings)``; a class whose
``__init__(self, settings)`` takes the settings qualifies.

Options reach a plugin as ``context.options``, merged with this precedence (highest first): the
request's ``plugin_options[name]``, options set on the :class:`PluginSet`, then
``settings.plugin_options[name]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

from opentelemetry import trace

from imagegen.errors import InvalidRequest
from imagegen.models import Contribution
from imagegen.settings import Settings
from imagegen.telemetry import tracer

__all__ = [
    "DEFAULT_PLUGIN_TIMEOUT",
    "ENTRY_POINT_GROUP",
    "PluginContext",
    "PluginInfo",
    "PluginSet",
    "PromptPlugin",
    "discover",
]

ENTRY_POINT_GROUP = "imagegen.plugins"
DEFAULT_PLUGIN_TIMEOUT = 5.0
"""Seconds one plugin may take before it is skipped."""

logger = logging.getLogger("imagegen.plugins")

# The built-ins resolve even from a source checkout that is not pip-installed (no entry points
# registered yet); an installed distribution declaring the same names takes precedence.
_BUILTINS = {
    "time_of_day": "imagegen_plugins.time_of_day:TimeOfDayPlugin",
    "holiday": "imagegen_plugins.holiday:HolidayPlugin",
    "art_style": "imagegen_plugins.art_style:ArtStylePlugin",
    "lora": "imagegen_plugins.lora:LoraPlugin",
    "remote_context": "imagegen_plugins.remote_context:RemoteContextPlugin",
}


@dataclass(frozen=True)
class PluginContext:
    """What a plugin sees of the generation it contributes to.

    Attributes:
        generation_id: The generation's id.
        prompt: The caller's prompt; None when the enhancer will dream one.
        now: The request's time, aware, in the request's time zone.
        timezone: The IANA zone ``now`` is expressed in.
        seed: The generation's seed.
        options: This plugin's options (see the module docstring for their precedence).
        settings: The service's settings.
        contributions: What the plugins before this one contributed.
        plugin: The name of the plugin this context was made for.
    """

    generation_id: str
    prompt: str | None
    now: datetime
    timezone: str
    seed: int
    settings: Settings
    options: Mapping[str, Any] = field(default_factory=dict)
    contributions: tuple[Contribution, ...] = ()
    plugin: str = ""

    def rng(self) -> random.Random:
        """A random generator seeded from (seed, plugin name): same request, same draws."""
        digest = hashlib.sha256(f"{self.seed}:{self.plugin}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))


@runtime_checkable
class PromptPlugin(Protocol):
    """Adds context to a generation's prompt.

    ``contribute`` may be a plain function or a coroutine function. Plain functions run in a
    worker thread, so blocking I/O there does not stall other requests. Return None to add
    nothing; raise :class:`~imagegen.errors.InvalidRequest` for bad options (the request fails);
    any other exception only skips this plugin.
    """

    name: str
    description: str

    def contribute(
        self, context: PluginContext
    ) -> Contribution | Awaitable[Contribution | None] | None:
        """This plugin's contribution to the generation described by ``context``."""
        ...


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``imagegen plugins``."""

    name: str
    description: str
    enabled: bool
    module: str
    distribution: str | None = None
    error: str | None = None


PluginFactory = Callable[[Settings], PromptPlugin]


def discover() -> dict[str, EntryPoint]:
    """The plugin entry points installed in this environment, built-ins included, by name."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            logger.warning(
                "plugin %s is declared twice (%s, %s); using the first",
                ep.name,
                found[ep.name].value,
                ep.value,
            )
            continue
        found.setdefault(ep.name, ep)
    for name, value in _BUILTINS.items():
        found.setdefault(name, EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP))
    return found


def _distribution(ep: EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return None if dist is None else str(dist.name)


def _unknown(names: Iterable[str], known: Iterable[str], field_name: str) -> InvalidRequest:
    known_text = ", ".join(known) or "none"
    errors = [
        {"field": field_name, "message": f"unknown plugin {name!r}; known: {known_text}"}
        for name in names
    ]
    return InvalidRequest(f"unknown plugin(s): {', '.join(names)}", errors=errors)


class PluginSet:
    """An ordered, configurable set of plugins; each instance keeps its own configuration.

    Args:
        plugins: Plugin objects, enabled in this order.
        settings: The settings handed to plugins through their context.
        timeout: Seconds each plugin may take per generation.
    """

    def __init__(
        self,
        plugins: Iterable[PromptPlugin] = (),
        *,
        settings: Settings,
        timeout: float = DEFAULT_PLUGIN_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self._plugins: dict[str, PromptPlugin] = {}
        self._order: list[str] = []
        self._options: dict[str, dict[str, Any]] = {}
        self._entry_points: dict[str, EntryPoint] = {}
        self._errors: dict[str, str] = {}
        for plugin in plugins:
            self.add(plugin)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        names: Sequence[str] | None = None,
        extra: Iterable[PromptPlugin] = (),
        *,
        timeout: float = DEFAULT_PLUGIN_TIMEOUT,
    ) -> PluginSet:
        """Discover the installed plugins and enable ``names`` (default ``settings.plugins``).

        ``extra`` plugin objects join the discovered ones (they win on a name clash) and run
        after the named ones. Only enabled plugins are instantiated.

        Raises:
            InvalidRequest: naming ``plugins`` when a name is neither discovered nor in extra.
        """
        wanted = list(dict.fromkeys(settings.plugins if names is None else names))
        plugin_set = cls(settings=settings, timeout=timeout)
        plugin_set._entry_points = discover()
        extra = list(extra)
        for plugin in extra:
            plugin_set.add(plugin, enabled=False)
        unknown = [n for n in wanted if n not in plugin_set.available]
        if unknown:
            raise _unknown(unknown, plugin_set.available, "plugins")
        plugin_set.set_order([*wanted, *(p.name for p in extra)])
        return plugin_set

    # Configuration

    @property
    def names(self) -> tuple[str, ...]:
        """The enabled plugins, in the order they run."""
        return tuple(self._order)

    @property
    def available(self) -> tuple[str, ...]:
        """Every plugin this set knows: enabled, disabled or not yet loaded."""
        return tuple(dict.fromkeys([*self._plugins, *self._entry_points]))

    def add(self, plugin: PromptPlugin, *, enabled: bool = True) -> None:
        """Add a plugin object (replacing one of the same name) and enable it at the end."""
        if not isinstance(plugin, PromptPlugin):
            raise TypeError(f"{plugin!r} is not a PromptPlugin (name, description, contribute)")
        self._plugins[plugin.name] = plugin
        if enabled and plugin.name not in self._order:
            self._order.append(plugin.name)

    def get(self, name: str) -> PromptPlugin:
        """The plugin called ``name``, instantiating it from its entry point on first use.

        Raises:
            KeyError: no such plugin.
        """
        if name not in self._plugins:
            ep = self._entry_points[name]
            try:
                factory: PluginFactory = ep.load()
                plugin = factory(self.settings)
            except Exception as exc:
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                raise
            if not isinstance(plugin, PromptPlugin):
                raise TypeError(f"entry point {ep.value} did not return a PromptPlugin")
            self._plugins[name] = plugin
        return self._plugins[name]

    def enable(self, name: str) -> None:
        """Run ``name`` too, after the enabled ones."""
        self.get(name)
        if name not in self._order:
            self._order.append(name)

    def disable(self, name: str) -> None:
        """Stop running ``name`` (it stays available)."""
        if name in self._order:
            self._order.remove(name)

    def set_order(self, names: Sequence[str]) -> None:
        """Enable exactly ``names``, in this order.

        Raises:
            InvalidRequest: naming ``plugins`` for names this set does not know.
        """
        unknown = [n for n in names if n not in self.available]
        if unknown:
            raise _unknown(unknown, self.available, "plugins")
        for name in names:
            self.get(name)
        self._order = list(dict.fromkeys(names))

    def set_options(self, name: str, options: Mapping[str, Any]) -> None:
        """Options for ``name`` in this set: over the settings', under the request's."""
        self._options[name] = dict(options)

    def __iter__(self) -> Iterator[PromptPlugin]:
        return (self._plugins[name] for name in self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._order

    def describe(self) -> list[PluginInfo]:
        """Every known plugin: the enabled ones first, in order, then the rest by name."""
        rest = sorted(n for n in self.available if n not in self._order)
        return [self._info(name) for name in [*self._order, *rest]]

    def _info(self, name: str) -> PluginInfo:
        ep = self._entry_points.get(name)
        plugin = self._plugins.get(name)
        description, module, error = "", "", self._errors.get(name)
        if plugin is not None:
            description = plugin.description
            module = type(plugin).__module__
        elif ep is not None:
            module = ep.module
            try:
                description = str(getattr(ep.load(), "description", ""))
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        distribution = None
        if ep is not None and module == ep.module:
            distribution = _distribution(ep)
        return PluginInfo(
            name=name,
            description=description,
            enabled=name in self._order,
            module=module,
            distribution=distribution,
            error=error,
        )

    # Running

    def select(self, selection: Sequence[str] | None) -> list[str]:
        """The plugins a request runs: ``selection`` (a subset of the enabled, in its order).

        Raises:
            InvalidRequest: naming ``plugins`` for names that are not enabled in this set.
        """
        if selection is None:
            return list(self._order)
        unknown = [n for n in selection if n not in self._order]
        if unknown:
            raise _unknown(unknown, self._order, "plugins")
        return list(dict.fromkeys(selection))

    def options_for(
        self, name: str, request_options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The options ``name`` runs with, merged by precedence."""
        return {
            **self.settings.plugin_options.get(name, {}),
            **self._options.get(name, {}),
            **((request_options or {}).get(name) or {}),
        }

    async def run(
        self,
        *,
        generation_id: str,
        seed: int,
        now: datetime,
        prompt: str | None = None,
        timezone: str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        selection: Sequence[str] | None = None,
    ) -> list[Contribution]:
        """Run the selected plugins in order; each one sees what the earlier ones added.

        A plugin that raises or exceeds the timeout is logged and skipped.

        Args:
            generation_id: The generation's id.
            seed: The generation's seed; plugins draw from it through ``context.rng()``.
            now: The request's time (naive means UTC).
            prompt: The caller's prompt, if any.
            timezone: IANA zone for ``now``; default ``settings.timezone``.
            options: The request's ``plugin_options``.
            selection: The request's ``plugins``; default every enabled plugin.

        Raises:
            InvalidRequest: ``selection`` names a plugin that is not enabled, or a plugin
                rejected its options.
        """
        names = self.select(selection)
        zone = timezone or self.settings.timezone
        aware = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
        base = PluginContext(
            generation_id=generation_id,
            prompt=prompt,
            now=aware.astimezone(ZoneInfo(zone)),
            timezone=zone,
            seed=seed,
            settings=self.settings,
        )
        contributions: list[Contribution] = []
        for name in names:
            context = replace(
                base,
                plugin=name,
                options=self.options_for(name, options),
                contributions=tuple(contributions),
            )
            contribution = await self._run_one(self._plugins[name], context)
            if contribution is not None:
                contributions.append(contribution)
        return contributions

    async def _run_one(self, plugin: PromptPlugin, context: PluginContext) -> Contribution | None:
        with tracer().start_as_current_span("imagegen.plugin") as span:
            span.set_attribute("imagegen.plugin.name", context.plugin)
            result = await self._contribution(plugin, context, span)
            span.set_attribute("imagegen.plugin.contributed", result is not None)
            return result

    async def _contribution(
        self, plugin: PromptPlugin, context: PluginContext, span: trace.Span
    ) -> Contribution | None:
        name = context.plugin
        try:
            async with asyncio.timeout(self.timeout):
                result: object = await _call(plugin.contribute, context)
        except InvalidRequest:
            raise
        except TimeoutError as exc:
            logger.warning("plugin %s timed out after %.2fs; skipped", name, self.timeout)
            _skipped(span, exc, f"timed out after {self.timeout:g}s")
            return None
        except Exception as exc:
            logger.warning("plugin %s failed; skipped", name, exc_info=True)
            _skipped(span, exc, f"failed: {type(exc).__name__}")
            return None
        if result is None:
            return None
        if not isinstance(result, Contribution):
            logger.warning("plugin %s returned %s, not a Contribution; skipped", name, type(result))
            span.set_status(trace.StatusCode.ERROR, f"returned {type(result).__name__}")
            return None
        if result.plugin != name:
            result = result.model_copy(update={"plugin": name})
        return result


def _skipped(span: trace.Span, error: BaseException, description: str) -> None:
    """Mark a plugin's span failed; the generation goes on without the plugin."""
    span.record_exception(error)
    span.set_status(trace.StatusCode.ERROR, description)


async def _call(fn: Callable[[PluginContext], Any], context: PluginContext) -> Contribution | None:
    """Await ``fn(context)``; a plain function runs in a daemon thread.

    A daemon thread rather than the loop's executor: a plugin that never returns is abandoned
    after its timeout instead of holding up the loop's shutdown.
    """
    if inspect.iscoroutinefunction(fn):
        result: Any = await fn(context)
        return result  # type: ignore[no-any-return]
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, error = fn(context), None
        except BaseException as exc:
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed while the plugin ran
            loop.call_soon_threadsafe(settle, value, error)

    # The caller's context goes along, so spans the plugin makes nest under its own.
    runner = contextvars.copy_context().run
    thread = threading.Thread(
        target=runner, args=(target,), name=f"plugin-{context.plugin}", daemon=True
    )
    thread.start()
    result = await future
    if inspect.isawaitable(result):
        result = await result
    return result  # type: ignore[no-any-return]
