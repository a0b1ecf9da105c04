"""Batches from an activation store: shuffled blocks, shuffle buckets, prefetched on a thread.

Each epoch visits the store's `chunk_rows` blocks in a seeded permutation; consecutive
blocks of that order form a bucket of about `shuffle_rows` rows, shuffled as a whole
(Gemma Scope's buckets of ~10^6 activations) and cut into batches (a bucket's last
partial batch is dropped). The position is three integers (epoch, bucket, batch), all
else follows from the seed, so a checkpoint restores the exact stream.

With a `target` site (a transcoder's) each row is the input's row followed by the
target's row of the same token, [d_in + d_out] wide: one stream, shuffled and
checkpointed as one.

`throughput()` reports the bytes read from the store and the rate (MiB/s) while
reading, for the training log.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from gemmascope.errors import UserError
from gemmascope.store import ActivationStore


@dataclass(frozen=True)
class LoaderState:
    epoch: int = 0
    bucket: int = 0
    batch: int = 0  # next batch to serve inside the bucket
    skipped_rows: int = 0  # rows dropped for NaN/inf so far (nonfinite="skip")


class ActivationLoader:
    def __init__(self, store: ActivationStore, site: str, layer: int, *, batch_size: int, shuffle_rows: int,
                 seed: int, stop_row: int, nonfinite: str = "error", prefetch: int = 4,
                 place=None, start: LoaderState = LoaderState(), target: str | None = None):
        self.store, self.site, self.layer = store, site, layer
        self.sites = (site,) if target is None else (site, target)
        self.batch_size, self.seed, self.nonfinite = batch_size, seed, nonfinite
        self.blocks = store.blocks(stop_row)
        if sum(b - a for a, b in self.blocks) < batch_size:
            raise UserError(f"{store.url}: {site} layer {layer} has {sum(b - a for a, b in self.blocks)} "
                            f"training rows, fewer than one batch ({batch_size})")
        self.blocks_per_bucket = max(1, shuffle_rows // store.chunk_rows)
        self.buckets_per_epoch = -(-len(self.blocks) // self.blocks_per_bucket)
        self.place = place or (lambda batch: batch)
        self.state = start
        self._read_bytes = 0
        self._read_seconds = 0.0
        self._began = time.perf_counter()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="activation-loader", daemon=True)
        self._thread.start()

    # The deterministic stream ---------------------------------------------------
    def _bucket_rows(self, epoch: int, bucket: int) -> tuple[np.ndarray, int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        chosen = sorted(order[bucket * self.blocks_per_bucket:(bucket + 1) * self.blocks_per_bucket])
        blocks = [self.blocks[i] for i in chosen]
        began = time.perf_counter()
        columns = [np.concatenate(self.store.read_blocks(site, self.layer, blocks)) for site in self.sites]
        rows = columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)
        self._read_seconds += time.perf_counter() - began
        self._read_bytes += rows.nbytes
        finite = np.isfinite(rows).all(axis=1)
        skipped = int((~finite).sum())
        if skipped:
            if self.nonfinite == "error":
                bad = int(np.flatnonzero(~finite)[0])
                row = _global_row(blocks, bad)
                raise UserError(f"{self.store.url}: {'+'.join(self.sites)} layer {self.layer} row {row} has NaN/inf values "
                                f"({skipped} such rows in this bucket); set train.nonfinite=skip to drop them")
            rows = rows[finite]
        permutation = np.random.default_rng([self.seed, epoch, bucket, 1]).permutation(len(rows))
        return rows[permutation], skipped

    def _produce(self) -> None:
        state = self.state
        try:
            while not self._stop.is_set():
                rows, skipped = self._bucket_rows(state.epoch, state.bucket)
                if state.batch == 0:
                    state = LoaderState(state.epoch, state.bucket, 0, state.skipped_rows + skipped)
                for index in range(state.batch, len(rows) // self.batch_size):
                    batch = rows[index * self.batch_size:(index + 1) * self.batch_size]
                    after = LoaderState(state.epoch, state.bucket, index + 1, state.skipped_rows)
                    if not self._put((after, batch)):
                        return
                bucket = state.bucket + 1
                epoch = state.epoch + bucket // self.buckets_per_epoch
                state = LoaderState(epoch, bucket % self.buckets_per_epoch, 0, state.skipped_rows)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            self._put((None, err))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # Consumer ----------------------------------------------------------------------
    def next(self):
        """The next batch, placed by `place` on this (the training) thread: a transfer issued
        from the reading thread can interleave with a multi-device step, and XLA's CPU
        collectives then wait for a device that never joins (seen with 2 devices).
        `self.state` becomes the position after the batch (what a checkpoint saves)."""
        state, batch = self._queue.get()
        if state is None:
            raise batch
        self.state = state
        return self.place(batch)

    def throughput(self) -> dict:
        """What the loader has read so far: `read_bytes`, `read_mib_s` (bytes per second of
        time spent in store reads: the store's delivered rate) and `wall_mib_s` (bytes per
        second since the loader started: below `read_mib_s` when training is the bottleneck)."""
        read_bytes, read_seconds = self._read_bytes, self._read_seconds
        wall = time.perf_counter() - self._began
        return {"read_bytes": read_bytes,
                "read_mib_s": read_bytes / 2**20 / read_seconds if read_seconds else 0.0,
                "wall_mib_s": read_bytes / 2**20 / wall if wall else 0.0}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _global_row(blocks: list[tuple[int, int]], index: int) -> int:
    for a, b in blocks:
        if index < b - a:
            return a + index
        index -= b - a
    return -1
