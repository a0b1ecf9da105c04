"""Multi-host training jobs as one JAX program (multi-controller).

A job whose SAEs are too wide for one host runs on several: every host runs the same
`train_job` after `initialize`, the mesh spans the global devices, and every array is
one global array of which each process holds its own shards. Everything that decides
what happens next (the step, the loader position, the metrics, whether to stop) is
computed identically on every process, so they never disagree; only the writer
(process 0) writes the job's files, so each file keeps the single writer that
`storage`'s atomic publish assumes.

With `dist=None` (or one process) none of this is visible: `is_writer()` is true,
barriers return at once, and SIGTERM is caught by a Python handler as before.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import jax
from jax.experimental import multihost_utils

from gemmascope.errors import UserError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a multi-host job (what `jax.distributed.initialize` takes)."""

    coordinator: str  # "host:port" of process 0's coordinator service
    processes: int
    process_id: int

    def __post_init__(self) -> None:
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"coordinator {self.coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
        if self.processes < 1:
            raise UserError(f"processes={self.processes}: a job needs at least 1 process")
        if not 0 <= self.process_id < self.processes:
            raise UserError(f"process_id={self.process_id}: must be in 0..{self.processes - 1} "
                            f"for processes={self.processes}")


def initialize(dist: Distributed | None) -> None:
    """Join the multi-host job `dist` (a no-op for None or one process); safe to call again
    with the same `dist`. Must come before anything starts JAX's backend in this process:
    the backend's device list and (on CPU) its cross-process collectives are fixed when it
    starts, so joining later would leave this process training alone."""
    if dist is None or dist.processes == 1:
        return
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (dist.processes, dist.process_id):
            raise UserError(f"this process already joined a JAX job as process {jax.process_index()} of "
                            f"{jax.process_count()}; cannot join {dist.coordinator} as process "
                            f"{dist.process_id} of {dist.processes}")
        return
    if jax.config.jax_cpu_collectives_implementation == "none":
        # Without it, CPU collectives between processes fail at the first step (CPU tests, CPU clusters).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(dist.coordinator, dist.processes, dist.process_id)
    except RuntimeError as err:  # backend already started, coordinator unreachable, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{dist.coordinator}: cannot join as process {dist.process_id} of {dist.processes}: "
                        f"{reason}") from None


def is_writer() -> bool:
    """True on process 0: the one process that writes job.json, normalisation.json,
    metrics.jsonl, the checkpoint manifest, the exported saes/ and done.json."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process got here (instant with one process). `name` must be the
    same on every process at the same point; a mismatch fails instead of pairing wrong points."""
    multihost_utils.sync_global_devices(name)


def host_copy(tree):
    """The whole value of every array of `tree` as numpy, on every process (a gather of the
    other processes' shards when the arrays span several)."""
    return multihost_utils.process_allgather(tree, tiled=True)


class PreemptionWatch:
    """Whether the job must checkpoint and stop after a step: the same answer on every process.

    One process: a Python SIGTERM handler (installed from the main thread only) sets a
    flag that `requested` reports. Several processes: a SIGTERM reaches one host or
    all of them at different steps, and a process that saved alone would wait forever
    in the checkpoint's collectives. JAX's preemption service (started by
    `jax.distributed.initialize`, which catches SIGTERM itself) tells every process
    about a notice on any of them and picks one step after every process's current
    step, at which `reached_preemption_sync_point` is true everywhere; all processes
    then save that step together and stop. It costs no device synchronisation, only
    a host-side check per step, which is why it is asked at every step.
    """

    def __init__(self) -> None:
        self._multi = jax.process_count() > 1
        self._terminated = threading.Event()
        self._previous = None

    def __enter__(self) -> PreemptionWatch:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._terminated.set())
        return self

    def requested(self, step: int) -> bool:
        """Call once after each step, on every process, with the number of steps done."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._terminated.is_set()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
