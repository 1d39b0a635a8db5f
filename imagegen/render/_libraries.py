"""Imported before the model libraries: their log lines, import-time warnings included, are JSON.

transformers and diffusers write warnings through a plain-text stderr handler of their own,
some of them while being imported; ``route_library_logs`` hands them to the root handler.
"""

from __future__ import annotations

from imagegen._logging import route_library_logs

route_library_logs(import_libraries=True)
