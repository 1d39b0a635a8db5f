"""PluginSet: an ordered, configurable set of plugins and the run over a generation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from importlib.metadata import EntryPoint
from typing import Any
from zoneinfo import ZoneInfo

from imagegen.errors import ConfigurationError, ImageGenError, InvalidRequest, first_line
from imagegen.identity import aware
from imagegen.models import (
    MAX_CONTRIBUTIONS,
    MAX_CONTRIBUTIONS_BYTES,
    MAX_PLUGIN_NAME_CHARS,
    Contribution,
    json_size,
)
from imagegen.plugins._running import LeftOut, close_plugin, refusal, run_plugin, warm_plugin
from imagegen.plugins.context import PluginContext, PluginFactory, PluginInfo, PromptPlugin
from imagegen.plugins.discovery import clash, declarations, distribution_of
from imagegen.settings import Settings
from imagegen.validation import parse_model

__all__ = ["DEFAULT_PLUGIN_TIMEOUT", "PluginSet"]

logger = logging.getLogger("imagegen.plugins")

DEFAULT_PLUGIN_TIMEOUT = 5.0
"""Seconds one plugin may take before it is skipped."""


def _unknown(names: Iterable[str], known: Iterable[str], field_name: str) -> InvalidRequest:
    known_text = ", ".join(known) or "none"
    errors = [
        {"field": field_name, "message": f"unknown plugin {name!r}; known: {known_text}"}
        for name in names
    ]
    return InvalidRequest(f"unknown plugin(s): {', '.join(names)}", errors=errors)


def _check_name(name: str) -> None:
    """Refuse a plugin name no contribution can carry (``Contribution.plugin``).

    Raises:
        ValueError: ``name`` is longer than :data:`MAX_PLUGIN_NAME_CHARS`.
    """
    if len(name) > MAX_PLUGIN_NAME_CHARS:
        raise ValueError(
            f"a plugin name of {len(name)} characters, at most {MAX_PLUGIN_NAME_CHARS}:"
            f" {name[:40]!r}..."
        )


def _revalidated(contribution: Contribution) -> Contribution:
    """``contribution`` as the job's next stage reads it: parsed anew from its JSON.

    An instance is not validated again where a job is built from it, so one a plugin changed
    after building it (more data than a contribution holds), built with ``model_construct``,
    or renamed for its plugin would make a job that render refuses for good.

    Raises:
        InvalidRequest: naming each field a contribution may not hold, or ``body`` for one
            that has no JSON form (a value of no JSON type set with ``model_construct``).
    """
    try:
        text = contribution.model_dump_json()
    except ValueError as exc:  # pydantic's PydanticSerializationError is one
        raise InvalidRequest(
            "contribution has no JSON form",
            errors=[{"field": "body", "message": first_line(exc)}],
        ) from None
    return parse_model(Contribution, text)


class _Kept:
    """The contributions a job keeps, in plugin order, within its bounds on all of them."""

    def __init__(self) -> None:
        self.contributions: list[Contribution] = []
        self._size = len("[]")  # of the contributions kept, as a JSON array

    def add(self, contribution: Contribution) -> Contribution:
        """Keep ``contribution`` as the job's next stage reads it (:func:`_revalidated`).

        Raises:
            LeftOut: it is no valid contribution, or the job has no room for it.
        """
        try:
            contribution = _revalidated(contribution)
        except InvalidRequest as exc:
            said = "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors)
            raise LeftOut(f"its contribution is invalid: {said.splitlines()[0][:300]}") from None
        # The job is built without what does not fit, rather than refused (a 500 at enhance).
        if len(self.contributions) == MAX_CONTRIBUTIONS:
            raise LeftOut(f"a job holds at most {MAX_CONTRIBUTIONS} contributions")
        # The array grows by a comma (after the first) and this contribution.
        size = self._size
        grown = size + bool(self.contributions) + json_size(contribution.model_dump(mode="json"))
        if grown > MAX_CONTRIBUTIONS_BYTES:
            raise LeftOut(
                f"its contribution takes {grown - size} bytes, {MAX_CONTRIBUTIONS_BYTES - size}"
                f" are left: a job's contributions take at most {MAX_CONTRIBUTIONS_BYTES}"
                " bytes together"
            )
        self.contributions.append(contribution)
        self._size = grown
        return contribution


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
        self._entry_points: dict[str, EntryPoint] = {}
        self._errors: dict[str, str] = {}
        self._clashes: dict[str, str] = {}  # names two installed packages declare: why
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
        after the named ones. Only enabled plugins are instantiated. Where the settings enable
        them (no ``names``), ``settings.plugin_options`` is checked as a request's is
        (:meth:`option_errors`): an option no enabled plugin would read fails every generation
        alike, rather than be ignored; so is a value a plugin that answers at once refuses
        (:meth:`_refused_options`). So are the settings each enabled plugin reads, where it
        says what is wrong with them (``setting_errors(time_limit)``: :meth:`setting_errors`).

        Raises:
            InvalidRequest: naming ``plugins`` when one of ``names`` is neither discovered nor
                in extra, or cannot be loaded.
            ConfigurationError: where the settings enable the plugins, naming
                ``plugins``' variable for such a name; ``plugin_options``' for options that
                name no enabled plugin, a key their plugin does not declare, or a value it
                refuses; and the variable of each setting an enabled plugin refuses.
        """
        wanted = list(dict.fromkeys(settings.plugins if names is None else names))
        plugin_set = cls(settings=settings, timeout=timeout)
        for name, declared in declarations().items():
            plugin_set._entry_points[name] = declared[0]
            if (ambiguous := clash(declared)) is not None:
                plugin_set._clashes[name] = ambiguous
        extra = list(extra)
        for plugin in extra:
            plugin_set.add(plugin, enabled=False)
        try:
            unknown = [n for n in wanted if n not in plugin_set.available]
            if unknown:
                raise _unknown(unknown, plugin_set.available, "plugins")
            plugin_set.set_order([*wanted, *(p.name for p in extra)])
        except InvalidRequest as exc:
            if names is not None:
                raise
            # Named by the settings: every generation would fail alike, the deployment's fault.
            said = [("plugins", e["message"]) for e in exc.errors]
            raise plugin_set._settings_fault(said) from None
        if names is None:
            options = plugin_set.option_errors(settings.plugin_options)
            said = [("plugin_options", f"{e['field']}: {e['message']}") for e in options]
            said += plugin_set._refused_options()
            said += [(e["field"], e["message"]) for e in plugin_set.setting_errors()]
            if said:
                raise plugin_set._settings_fault(said)
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
        """Add a plugin object (replacing one of the same name) and enable it at the end.

        Raises:
            TypeError: ``plugin`` is no :class:`PromptPlugin`.
            ValueError: its name is longer than a contribution's ``plugin`` takes
                (:data:`~imagegen.models.MAX_PLUGIN_NAME_CHARS`).
        """
        if not isinstance(plugin, PromptPlugin):
            raise TypeError(f"{plugin!r} is not a PromptPlugin (name, description, contribute)")
        _check_name(plugin.name)
        self._plugins[plugin.name] = plugin
        if enabled and plugin.name not in self._order:
            self._order.append(plugin.name)

    def get(self, name: str) -> PromptPlugin:
        """The plugin called ``name``, instantiating it from its entry point on first use.

        Raises:
            KeyError: no such plugin.
            LookupError: two installed packages declare ``name`` (neither is loaded).
        """
        if name not in self._plugins:
            if name in self._clashes:
                self._errors[name] = self._clashes[name]
                raise LookupError(f"plugin {name!r} is {self._clashes[name]}")
            ep = self._entry_points[name]
            try:
                _check_name(name)
                factory: PluginFactory = ep.load()
                plugin: object = factory(self.settings)  # a plugin's code: checked below
            except Exception as exc:
                self._errors[name] = f"{type(exc).__name__}: {exc}"
                raise
            if not isinstance(plugin, PromptPlugin):
                self._errors[name] = f"TypeError: {ep.value} made no PromptPlugin"
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
            InvalidRequest: naming ``plugins`` for names this set does not know, whose
                plugin cannot be loaded (its module, its factory or what that returns), or
                that two installed packages declare (naming both).
        """
        unknown = [n for n in names if n not in self.available]
        if unknown:
            raise _unknown(unknown, self.available, "plugins")
        broken = []
        for name in names:
            if name in self._clashes and name not in self._plugins:
                self._errors[name] = self._clashes[name]
                message = f"plugin {name!r} is {self._clashes[name]}"
                broken.append({"field": "plugins", "message": message})
                continue
            try:
                self.get(name)
            except Exception as exc:  # a plugin's own code: anything may go wrong in it
                broken.append(
                    {
                        "field": "plugins",
                        "message": f"plugin {name!r} cannot be loaded"
                        f" ({type(exc).__name__}: {first_line(exc)})",
                    }
                )
        if broken:
            raise InvalidRequest("plugin(s) cannot be loaded", errors=broken)
        self._order = list(dict.fromkeys(names))

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
        if plugin is None and name in self._clashes:
            error = self._clashes[name]
        elif plugin is not None:
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
            distribution = distribution_of(ep)
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
            # One installed but not enabled is the deployment's choice, and said as such.
            variable = self.settings.variable("plugins")
            errors = [
                {
                    "field": "plugins",
                    "message": f"plugin {n!r} is installed but not enabled ({variable})",
                }
                if n in self.available
                else _unknown([n], self._order, "plugins").errors[0]
                for n in unknown
            ]
            raise InvalidRequest(f"plugin(s) not enabled: {', '.join(unknown)}", errors=errors)
        return list(dict.fromkeys(selection))

    def options_for(
        self, name: str, request_options: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The options ``name`` runs with: the settings', each key the request gives over."""
        return {
            **self.settings.plugin_options.get(name, {}),
            **((request_options or {}).get(name) or {}),
        }

    def option_errors(
        self, options: Mapping[str, Mapping[str, Any]] | None
    ) -> list[dict[str, str]]:
        """What is wrong with a request's ``plugin_options``, one entry per field.

        A name that is no enabled plugin's is refused (``plugin_options.<name>``), and so is a
        key the plugin does not declare among its ``option_names``
        (``plugin_options.<plugin>.<key>``); a plugin that declares none takes any key.
        """
        errors: list[dict[str, str]] = []
        for name, given in (options or {}).items():
            if name not in self._order:
                enabled = ", ".join(self._order) or "none"
                errors.append(
                    {
                        "field": f"plugin_options.{name}",
                        "message": f"no enabled plugin {name!r}; enabled: {enabled}",
                    }
                )
                continue
            declared = getattr(self._plugins[name], "option_names", None)
            if declared is None or not isinstance(given, Mapping):
                continue
            known = ", ".join(declared) or "none"
            errors.extend(
                {
                    "field": f"plugin_options.{name}.{key}",
                    "message": f"unknown option of plugin {name!r}; known: {known}",
                }
                for key in given
                if key not in declared
            )
        return errors

    def _refused_options(self) -> list[tuple[str, str]]:
        """The operator's options that the plugins answering at once refuse, (setting, why)
        each, as :meth:`_settings_fault` takes them.

        Each such plugin (a plain ``contribute`` with ``blocking = False``: a look-up in
        memory) that the settings give options is called once with them, as a request would
        call it (:func:`~imagegen.plugins._running.refusal`): a value it cannot take
        (``{"art_style": {"style": 5}}``) is refused where the set is made, not at every
        generation. A plugin that fetches or computes refuses its at each request instead
        (:meth:`_whose`): calling it here would reach its endpoint, or build its tables,
        before the function could say it is ready.
        """
        said: list[tuple[str, str]] = []
        zone = self.settings.timezone
        for name in self._order:
            if not self.settings.plugin_options.get(name):
                continue
            context = PluginContext(
                generation_id="settings",
                prompt=None,
                now=datetime.now(ZoneInfo(zone)),
                timezone=zone,
                seed=0,
                settings=self.settings,
                options=self.options_for(name),
                plugin=name,
            )
            refused = refusal(self._plugins[name], context)
            if isinstance(refused, ConfigurationError):  # its fields are variables already
                said += [(e["field"], e["message"]) for e in refused.errors]
            elif refused is not None:
                said += [
                    ("plugin_options", f"{e['field']}: {e['message']}") for e in refused.errors
                ]
        return said

    def setting_errors(self) -> list[dict[str, str]]:
        """What the enabled plugins find wrong with the settings they read, one entry per
        setting (``field``: its name in :class:`~imagegen.settings.Settings`).

        A plugin may define ``setting_errors(time_limit)``, ``time_limit`` being the seconds
        each of its calls gets, to be asked once, where the set is made from the settings,
        rather than fail (or log) at every request. One whose check raises is logged, not
        refused: the plugin's own failure is no fault of the settings.
        """
        errors: list[dict[str, str]] = []
        for name in self._order:
            check = getattr(self._plugins[name], "setting_errors", None)
            if check is None:
                continue
            try:
                errors.extend(check(self.timeout))
            except Exception as exc:  # a plugin's own code
                logger.warning(
                    "plugin %s could not check its settings: %s: %s", name, type(exc).__name__, exc
                )
        return errors

    def _whose(
        self,
        exc: InvalidRequest,
        name: str,
        options: Mapping[str, Mapping[str, Any]] | None,
    ) -> ImageGenError:
        """A plugin's refusal of its options, as the fault of whoever set them: the request's
        (``exc``, a 400) or, for an option the request did not give, the deployment's (a
        :class:`ConfigurationError`, 503: every request would fail alike until the settings
        are fixed, and an event is retried rather than dropped)."""
        given = (options or {}).get(name) or {}
        prefix = f"plugin_options.{name}."
        keys = [e["field"][len(prefix) :] for e in exc.errors if e["field"].startswith(prefix)]
        if not keys or any(key in given for key in keys):
            return exc
        return self._settings_fault(
            [("plugin_options", f"{e['field']}: {e['message']}") for e in exc.errors]
        )

    def _settings_fault(self, said: list[tuple[str, str]]) -> ConfigurationError:
        """``said``, (setting, why) each, as the settings' fault, naming each one's variable:
        ``invalid settings: IMAGEGEN_PLUGIN_OPTIONS (why; why)``."""
        named: dict[str, list[str]] = {}
        for setting, message in said:
            named.setdefault(self.settings.variable(setting), []).append(message)
        summary = "; ".join(f"{variable} ({'; '.join(why)})" for variable, why in named.items())
        return ConfigurationError(
            f"invalid settings: {summary}",
            errors=[{"field": v, "message": m} for v, why in named.items() for m in why],
        )

    async def warm_up(self) -> list[str]:
        """Warm every enabled plugin that can (``warm_up()``), in order; their names.

        A plugin whose warm-up fails is logged and left to build what it needs on its first
        request, as it would have without warming.
        """
        return [name for name in self._order if await warm_plugin(self._plugins[name], name)]

    async def aclose(self) -> None:
        """Close every plugin that holds something (``aclose()``), all at once, each within
        :data:`~imagegen.plugins._running.CLOSE_SECONDS`; a failure or a close past its time
        is logged, naming the plugin."""
        await asyncio.gather(*(close_plugin(p, name) for name, p in self._plugins.items()))

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

        A plugin that raises or exceeds the timeout is logged and skipped. So is one whose
        contribution the job has no room for: past :data:`MAX_CONTRIBUTIONS` of them, or past
        :data:`MAX_CONTRIBUTIONS_BYTES` with the ones kept before it (a later, smaller one that
        still fits is kept), and one that is no valid contribution once read from its JSON, as
        the next stage reads the job (changed after it was built, or never validated). The
        contributions returned always make a valid job.

        Args:
            generation_id: The generation's id.
            seed: The generation's seed; plugins draw from it through ``context.rng()``.
            now: The request's time (naive means UTC).
            prompt: The caller's prompt, if any.
            timezone: IANA zone for ``now``; default ``settings.timezone``.
            options: The request's ``plugin_options``.
            selection: The request's ``plugins``; default every enabled plugin.

        Raises:
            InvalidRequest: ``selection`` names a plugin that is not enabled, ``options`` one
                that is not enabled or an option its plugin does not declare, or a plugin
                rejected its options.
            ConfigurationError: a plugin rejected the options the settings give it.
        """
        names = self.select(selection)
        if errors := self.option_errors(options):
            fields = ", ".join(e["field"] for e in errors)
            raise InvalidRequest(f"invalid plugin_options: {fields}", errors=errors)
        zone = timezone or self.settings.timezone
        base = PluginContext(
            generation_id=generation_id,
            prompt=prompt,
            now=aware(now).astimezone(ZoneInfo(zone)),
            timezone=zone,
            seed=seed,
            settings=self.settings,
        )
        kept = _Kept()
        for name in names:
            context = replace(
                base,
                plugin=name,
                options=self.options_for(name, options),
                contributions=tuple(kept.contributions),
            )
            # Kept or left out within the plugin's span, which says which (and why).
            try:
                await run_plugin(
                    self._plugins[name], context, time_limit=self.timeout, keep=kept.add
                )
            except InvalidRequest as exc:
                raise self._whose(exc, name, options) from None
        return kept.contributions
