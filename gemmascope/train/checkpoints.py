"""Orbax checkpoints of a training job: state (params, optimiser, step, counters) + loader position.

Orbax writes each step into a temporary directory and renames it when complete. After
that rename we write `checksums.json` into the step (the crc32c of every file in it):
that file is the checkpoint's commit point. A step without it (killed between the two)
is deleted on open and the job resumes from the step before; a step whose files no
longer match (a flipped bit, a truncated file) fails the restore with the file's name
instead of training on damaged state. Saves are synchronous: the next step must not
race the write.

In a multi-host job every process opens, saves and restores (Orbax writes each
process's shards and lets process 0 rename the step); the manifest is written by the
writer alone, between a barrier that follows every process's shards and one that makes
"saved" mean committed on every process. Deleting an uncommitted step is a collective
too (Orbax deletes on process 0, then waits for all), so every process must decide the
same: they all list the steps before any deletion starts.
"""

from __future__ import annotations

import logging
from typing import Any

import google_crc32c
import jax
import orbax.checkpoint as ocp

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.faults import crash_point
from gemmascope.train.distributed import barrier, is_writer

MANIFEST = "checksums.json"
log = logging.getLogger("gemmascope.train")


class Checkpoints:
    def __init__(self, url: str, keep: int = 2):
        self.directory = storage.normalize(url)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        barrier("checkpoints listed")
        for step in self.manager.all_steps():
            if not storage.exists(self._manifest_url(step)):
                log.warning("%s: step %d has no %s (killed while saving); deleting it", self.directory, step,
                            MANIFEST)
                self.manager.delete(step)

    def _step_url(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    def _manifest_url(self, step: int) -> str:
        return storage.join(self._step_url(step), MANIFEST)

    def _checksums(self, step: int) -> dict[str, int]:
        """crc32c of every file of the step, by path relative to the step directory."""
        root = self._step_url(step)
        fs, path = storage.filesystem(root)
        files = storage.with_retries(lambda: fs.find(path), what=root)
        names = [name[len(path.rstrip("/")) + 1:] for name in files]
        return {name: google_crc32c.value(storage.read_bytes(storage.join(root, name)))
                for name in names if name != MANIFEST}

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        crash_point("train.checkpoint_saved")  # saved by Orbax, not yet committed by its manifest
        barrier(f"checkpoint {step} saved")
        if is_writer():
            storage.write_json_atomic(self._manifest_url(step), self._checksums(step))
        barrier(f"checkpoint {step} committed")

    def verify(self, step: int) -> None:
        """Raise a `UserError` naming the first file of `step` that is missing or changed."""
        recorded = storage.read_json(self._manifest_url(step))
        found = self._checksums(step)
        for name, crc in sorted(recorded.items()):
            if name not in found:
                raise UserError(f"{storage.join(self._step_url(step), name)}: checkpoint file missing")
            if found[name] != crc:
                raise UserError(f"{storage.join(self._step_url(step), name)}: checkpoint file damaged "
                                f"(crc32c {found[name]:#010x}, recorded {crc:#010x})")

    def restore(self, abstract_state: Any) -> tuple[Any, dict]:
        """The latest checkpoint, verified, placed with the shardings carried by `abstract_state`."""
        step = self.latest_step
        self.verify(step)
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()
