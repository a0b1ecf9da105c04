"""Large arrays on transparent huge pages: start the process with glibc's `hugetlb` tunable.

A training step allocates its big buffers afresh each time (XLA's temporaries, the
sparse kernels' outputs, the host-callback copies), and glibc serves each from a new
mapping: on 4 KiB pages the kernel then faults in and zeroes 600 MB a step, one page
at a time. With `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages
(madvise), 512 times fewer faults: the (2304, 16384, 4096) dense step went from 8.7 s
to 6.4 s on a 2-core CPU host, the sparse one from 4.0 s to 3.0 s. glibc reads its
tunables once, at exec, so the command line re-executes itself with the variable set
(and Ray workers get it through their runtime environment). GEMMASCOPE_HUGE_PAGES=0
turns this off; on other C libraries it does nothing.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "GEMMASCOPE_HUGE_PAGES"


def glibc_tunables(environ: Mapping[str, str]) -> str | None:
    """The GLIBC_TUNABLES value asking for huge pages, keeping any tunables already set;
    None when there is nothing to add (already there, turned off, or not glibc >= 2.35)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0" or "glibc.malloc.hugetlb=" in current:
        return None
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def without_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with the huge-page tunable taken out of GLIBC_TUNABLES (others kept)."""
    kept = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    plain = {name: value for name, value in environ.items() if name != "GLIBC_TUNABLES"}
    return {**plain, "GLIBC_TUNABLES": ":".join(kept)} if kept else plain


def worker_env() -> dict[str, str]:
    """What a process started for us (a Ray worker) needs in its environment."""
    tunables = glibc_tunables(os.environ) or os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": tunables} if tunables else {}


def reexec_with_huge_pages() -> None:
    """Replace this process with itself, the tunable set, unless it is already set.

    Call before anything is allocated worth keeping: nothing survives the exec."""
    tunables = glibc_tunables(os.environ)
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
