"""Imported before the model libraries: their log lines, import-time warnings included, are JSON,
and their progress bars start no thread.

transformers and diffusers write warnings through a plain-text stderr handler of their own,
some of them while being imported; ``route_library_logs`` hands them to the root handler.
"""

from __future__ import annotations

import tqdm

from imagegen._logging import route_library_logs

route_library_logs(import_libraries=True)

# diffusers makes a tqdm bar for every pipeline call, switched off by the backend; tqdm starts
# its monitor thread for any bar, a disabled one too, and the thread then wakes every 10 s for
# the life of the process. Nothing here shows a bar: no monitor (tqdm's documented switch).
tqdm.tqdm.monitor_interval = 0
