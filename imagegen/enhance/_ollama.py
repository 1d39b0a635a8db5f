"""The ``ollama`` package, imported whatever ``OLLAMA_HOST`` holds.

Its ``__init__`` makes a default client at import (``ollama/__init__.py``: ``_client =
Client()``), which parses ``OLLAMA_HOST`` (``ollama/_client.py``, ``BaseClient.__init__``,
``_parse_host``): a malformed value fails the import itself, with a traceback, even where
``IMAGEGEN_OLLAMA_HOST`` names a good host. imagegen gives every client it makes its host (the
setting, which reads ``OLLAMA_HOST`` too and refuses a malformed one by name), so the default
client is imported without the variable.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["ollama"]


def _imported() -> ModuleType:
    try:
        return importlib.import_module("ollama")
    except ValueError:
        saved = os.environ.pop("OLLAMA_HOST", None)
        if saved is None:
            raise
        try:
            return importlib.import_module("ollama")
        finally:
            os.environ["OLLAMA_HOST"] = saved


if TYPE_CHECKING:
    import ollama
else:
    ollama = _imported()
