"""The process re-executes itself with glibc's huge-page tunable, keeping the caller's
other tunables, and its large arrays then sit on transparent huge pages; Ray workers
get the tunable too."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gemmascope.huge_pages import OPT_OUT, TUNABLE, glibc_tunables, without_huge_pages

GLIBC = platform.libc_ver()[0] == "glibc" and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 35)
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc >= 2.35 reads glibc.malloc.hugetlb")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODE = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"

# Re-executes itself, fills 256 MiB from malloc (as XLA and numba allocate; numpy asks
# for huge pages itself), prints its tunables and huge-page kB.
CHILD = """
import ctypes, os
from gemmascope.huge_pages import reexec_with_huge_pages
reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(256 * 2**20)
ctypes.memset(block, 1, 256 * 2**20)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(os.environ.get("GLIBC_TUNABLES", ""), huge)
"""


def _child(**env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", CHILD], env={**environ, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return (out[0], int(out[1])) if len(out) == 2 else ("", int(out[0]))


@needs_glibc
def test_tunables_keep_the_callers_and_are_added_once():
    assert glibc_tunables({}) == TUNABLE
    assert glibc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert glibc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the caller's choice stands
    assert glibc_tunables({"GLIBC_TUNABLES": TUNABLE}) is None
    assert glibc_tunables({OPT_OUT: "0"}) is None


def test_a_child_can_be_started_without_the_tunable_keeping_the_others():
    """What `bench peers` gives a peer on glibc's default malloc."""
    assert without_huge_pages({"GLIBC_TUNABLES": TUNABLE, "HOME": "/h"}) == {"HOME": "/h"}
    assert without_huge_pages({"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert without_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


@needs_glibc
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_reexec_puts_large_arrays_on_huge_pages():
    tunables, huge_kb = _child(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
    assert tunables == f"glibc.malloc.arena_max=4:{TUNABLE}"
    off_tunables, off_huge_kb = _child(**{OPT_OUT: "0"})
    assert off_tunables == ""
    if THP_MODE == "never":
        pytest.skip("transparent huge pages are off on this kernel")
    assert huge_kb >= 128 * 1024, huge_kb  # most of the 256 MiB block
    if THP_MODE == "madvise":  # only asked-for mappings get them
        assert off_huge_kb < 64 * 1024, off_huge_kb


@pytest.mark.ray
@needs_glibc
def test_ray_workers_start_with_the_tunable(ray_address):
    import ray

    @ray.remote
    def tunables() -> str:
        return os.environ.get("GLIBC_TUNABLES", "")

    assert TUNABLE in ray.get(tunables.remote()).split(":")
