"""What a function's process sets before the library loads: imported first by :mod:`_adapter`.

Each line here makes a start or a first request cheaper and changes nothing a function does.
"""

import os
import sys

# httpx imports its command line (rich and pygments behind it) whenever click is installed,
# and functions-framework installs click (httpx/__init__.py: ``try: from ._main import main``
# ``except ImportError``). No function runs it: None here is the ImportError httpx expects,
# and the first request that talks HTTP (enhance's first prompt) does not load a terminal UI.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

# Pydantic looks for plugins (an entry-point scan of every installed package) when it builds
# its first validator, at import (pydantic/plugin/_loader.py); no function has any. An empty
# PYDANTIC_DISABLE_PLUGINS in the environment lets them load.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
