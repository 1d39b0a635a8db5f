"""Render's process keeps the memory a pipeline call frees (glibc's malloc thresholds)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's"
)

# RSS grown by a 16 MiB block once it is freed again: with glibc's first threshold (128 KiB)
# the block is a mapping of its own, unmapped on free; with render's, it comes from the heap
# and stays for the next call.
SCRIPT = """
import os, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "render":
    from imagegen.render import _libraries
    print(_libraries.KEEPS_FREED_MEMORY)
else:
    print(None)
before = rss()
block = b"\\x01" * (16 << 20)
del block
print(rss() - before)
"""


def kept_after_free(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
        check=True,
    )
    flag, grown = done.stdout.split()
    return flag, int(grown)


def test_render_keeps_a_freed_block_for_the_next_call() -> None:
    flag, grown = kept_after_free("render")
    assert flag == "True"
    assert grown >= 15 << 20
    # Without render's thresholds, glibc hands the block back at once.
    flag, grown = kept_after_free("bare")
    assert grown < 4 << 20


@pytest.mark.parametrize(
    "variable",
    [
        {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
        {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={128 << 10}"},
    ],
)
def test_an_operators_own_thresholds_stand(variable: dict[str, str]) -> None:
    flag, grown = kept_after_free("render", **variable)
    assert flag == "False"
    assert grown < 4 << 20
