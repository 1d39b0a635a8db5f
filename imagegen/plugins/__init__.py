"""Prompt plugins: the contract, discovery through entry points, and the runner.

A plugin adds a fragment (and structured data, and LoRA hints) to a generation's prompt. Third-
party packages ship plugins by declaring an entry point in the group ``imagegen.plugins``::

    [project.entry-points."imagegen.plugins"]
    weather = "my_package.weather:WeatherPlugin"

The entry point resolves to a factory called as ``factory(settings)``; a class whose
``__init__(self, settings)`` takes the settings qualifies.

Options reach a plugin as ``context.options``, merged with this precedence (highest first): the
request's ``plugin_options[name]``, then ``settings.plugin_options[name]``, key by key.

- :mod:`imagegen.plugins.context`: :class:`PromptPlugin`, :class:`PluginContext`,
  :class:`PluginInfo`.
- :mod:`imagegen.plugins.discovery`: the entry points and the built-ins.
- :mod:`imagegen.plugins.pluginset`: :class:`PluginSet`, which configures and runs them.
"""

from __future__ import annotations

from imagegen.plugins._running import noting_skips
from imagegen.plugins.context import PluginContext, PluginInfo, PromptPlugin
from imagegen.plugins.context import PluginFactory as PluginFactory
from imagegen.plugins.discovery import ENTRY_POINT_GROUP, discover
from imagegen.plugins.pluginset import DEFAULT_PLUGIN_TIMEOUT, PluginSet

__all__ = [
    "DEFAULT_PLUGIN_TIMEOUT",
    "ENTRY_POINT_GROUP",
    "PluginContext",
    "PluginInfo",
    "PluginSet",
    "PromptPlugin",
    "discover",
    "noting_skips",
]
