"""Named crash points: where a process may be killed on purpose to prove that it resumes.

The promise "kill any stage anywhere, rerun, same result" is only as good as the places
it was tested at. Every commit boundary and every multi-part write calls `crash_point`
with a name; normally that is one dictionary lookup. With

    GEMMASCOPE_CRASH_AT=<name prefix>:<n>      (e.g. "storage.publish:7", or ":12" for any point)
    GEMMASCOPE_CRASH_MARK=<path>               (a file that records that the crash happened)

the process SIGKILLs itself at the n-th point whose name starts with the prefix: no
cleanup, no flush, exactly like a preempted machine. The mark file is created first
(exclusively), so across every process of a run (Ray workers included) the crash
happens once and the rerun goes through. `GEMMASCOPE_CRASH_TRACE=<path>` appends
"<pid> <name>" for every point passed, which is how the crash matrix learns how many
each process meets.
"""

from __future__ import annotations

import os
import signal

CRASH_AT = "GEMMASCOPE_CRASH_AT"
CRASH_MARK = "GEMMASCOPE_CRASH_MARK"
CRASH_TRACE = "GEMMASCOPE_CRASH_TRACE"
VARIABLES = (CRASH_AT, CRASH_MARK, CRASH_TRACE)

_passed: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(CRASH_AT)
    if not spec:
        return None
    prefix, _, count = spec.rpartition(":")
    return prefix, int(count)


def _claim_mark() -> bool:
    """True for the one process that gets to crash (it created the mark file)."""
    mark = os.environ.get(CRASH_MARK)
    if not mark:
        return True
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def crash_point(name: str) -> None:
    """Die here if the environment asks for it (see the module docstring); else nothing."""
    trace = os.environ.get(CRASH_TRACE)
    if trace:
        with open(trace, "a") as handle:
            handle.write(f"{os.getpid()} {name}\n")
    target = _target()
    if target is None or not name.startswith(target[0]):
        return
    _passed[target[0]] = _passed.get(target[0], 0) + 1
    if _passed[target[0]] == target[1] and _claim_mark():
        os.kill(os.getpid(), signal.SIGKILL)
