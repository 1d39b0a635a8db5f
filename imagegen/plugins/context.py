"""The plugin contract: what a plugin sees, what it implements, how it is listed."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from imagegen.models import Contribution
from imagegen.settings import Settings

__all__ = ["PluginContext", "PluginFactory", "PluginInfo", "PromptPlugin"]


@dataclass(frozen=True)
class PluginContext:
    """What a plugin sees of the generation it contributes to.

    Attributes:
        generation_id: The generation's id.
        prompt: The caller's prompt; None when the enhancer will dream one.
        now: The request's time, aware, in the request's time zone.
        timezone: The IANA zone ``now`` is expressed in.
        seed: The generation's seed.
        options: This plugin's options (see :mod:`imagegen.plugins` for their precedence).
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
    worker thread, so blocking I/O there does not stall other requests; a plugin whose plain
    ``contribute`` neither blocks nor computes for long may set the class attribute
    ``blocking = False`` to run on the event loop instead, sparing each request a thread's
    round trip (its time limit then cannot cut it short); such a plugin given options in the
    settings is also called once where the plugin set is made from them, with those options,
    so that a value it refuses fails at start-up rather than at every request. Return None to add
    nothing; raise :class:`~imagegen.errors.InvalidRequest` for bad options (the request fails);
    any other exception only skips this plugin (raise
    :class:`~imagegen.errors.ConfigurationError` for an option only the operator sets).

    A plugin may declare ``option_names``, the keys of its options: a request that gives it
    any other key is refused, naming it. One that declares none takes any key.

    A plugin may also define ``warm_up()`` (plain or coroutine, no arguments): a function calls
    it once, in the background, after it has turned ready, to build what the plugin's first
    ``contribute`` would otherwise build while a request waits (imports, tables, caches). It
    must not change what ``contribute`` returns, and its failure is logged and ignored. And
    ``aclose()`` (a coroutine): called when the plugin set is closed, to release what the
    plugin holds (``remote_context``'s connections). A plugin that reads ``IMAGEGEN_*``
    variables of its own declares them as the class attribute ``environment_variables`` (a
    tuple of names), so that they draw no warning of an unknown setting.
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
"""What an entry point resolves to: called as ``factory(settings)``."""
