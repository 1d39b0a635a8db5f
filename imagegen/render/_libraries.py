"""Imported before the model libraries: their log lines, import-time warnings included, are JSON,
their progress bars start no thread, and glibc's malloc keeps the memory a render frees.

transformers and diffusers write warnings through a plain-text stderr handler of their own,
some of them while being imported; ``route_library_logs`` hands them to the root handler.
"""

from __future__ import annotations

import ctypes
import os
import platform

import tqdm

from imagegen._logging import route_library_logs

route_library_logs(import_libraries=True)

# diffusers makes a tqdm bar for every pipeline call, switched off by the backend; tqdm starts
# its monitor thread for any bar, a disabled one too, and the thread then wakes every 10 s for
# the life of the process. Nothing here shows a bar: no monitor (tqdm's documented switch).
tqdm.tqdm.monitor_interval = 0


# glibc's malloc (malloc/malloc.c, mallopt(3)). A pipeline call allocates and frees tensors of
# megabytes: above the mmap threshold (128 KiB at first) each is a fresh mapping, unmapped when
# freed, and every call faults its pages in again; below it, a free at the heap's top beyond the
# trim threshold is handed back to the system, to be faulted in again by the next call. glibc
# raises both thresholds itself when it frees a large mapping, up to 32 MiB and twice that, but
# only as calls of ever larger tensors come: a render on the CPU ran 62-76 ms a call before a
# batch had freed large enough ones and 53-55 ms after it (docs/rendering.md#the-cpu). Set from
# the start, every call runs as fast as the last, for up to 64 MiB kept free at the top of each
# of malloc's arenas.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on a 64-bit host: glibc's own ceiling
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc sets beside it


def _keep_freed_memory() -> bool:
    """Set glibc's thresholds, unless the process is not on glibc or its operator set them
    (``MALLOC_*_`` or ``GLIBC_TUNABLES``); whether they were set here."""
    if platform.libc_ver()[0] != "glibc":
        return False
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in chosen) or "glibc.malloc." in tunables:
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


KEEPS_FREED_MEMORY = _keep_freed_memory()
"""Whether this process's malloc thresholds were set here."""
