"""Orbax checkpoints of a training job: state (params, optimiser, step, counters) + loader position.

Orbax writes each step into a temporary directory and renames it when complete, so the
latest step it lists is always a whole checkpoint; a run killed mid-save resumes from
the one before. Saves are synchronous: the next step must not race the write.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from gemmascope import storage


class Checkpoints:
    def __init__(self, url: str, keep: int = 2):
        directory = storage.normalize(url)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any) -> tuple[Any, dict]:
        """The latest checkpoint, placed with the shardings carried by `abstract_state`."""
        step = self.latest_step
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()
