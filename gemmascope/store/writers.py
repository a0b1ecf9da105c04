"""Writers for one work unit's rows of one array: zarr3 shards or a Parquet file.

A unit streams rows in order; the writer buffers exactly one storage shard and writes
it whole (a partial shard write would rewrite the shard object each time), keeping at
most two writes in flight so the next forward pass overlaps the I/O. Kept positions are
gathered straight into the shard buffer, and TensorStore writes from that buffer without
copying it (a fresh one per shard, never touched again), so a row crosses host memory
once on its way from the forward's output to the file.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gemmascope import storage
from gemmascope.faults import crash_point
from gemmascope.store.parquet_io import WRITE_OPTIONS

if TYPE_CHECKING:
    from gemmascope.models.backends import KeptRows


def extend_crc32c(crc: int, rows: np.ndarray) -> int:
    """The running crc32c of a unit's rows as stored (little-endian, row-major): the
    ledger records it so `ActivationStore.verify` can audit a whole store."""
    return google_crc32c.extend(crc, np.ascontiguousarray(rows).tobytes())


class ZarrRowWriter:
    def __init__(self, array, start: int, stop: int, shard_rows: int, max_in_flight: int = 2):
        self.array, self.position, self.stop = array, start, stop
        self.shard_rows = shard_rows
        self.dtype = array.dtype.numpy_dtype
        self.width = array.shape[1]
        self.max_in_flight = max_in_flight
        self.in_flight: deque = deque()
        self.crc32c = 0
        self._new_buffer()

    def _new_buffer(self) -> None:
        rows = min(self.shard_rows, self.stop - self.position)
        self.buffer = np.empty((rows, self.width), dtype=self.dtype)
        self.filled = 0

    def append(self, rows: KeptRows) -> None:
        done = 0
        while done < len(rows):
            take = min(len(rows) - done, len(self.buffer) - self.filled)
            rows.take(done, self.buffer[self.filled:self.filled + take])
            self.filled += take
            done += take
            if self.filled == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        end = self.position + len(self.buffer)
        self.crc32c = extend_crc32c(self.crc32c, self.buffer)
        write = self.array[self.position:end].write(self.buffer, can_reference_source_data_indefinitely=True)
        self.in_flight.append((write, self.position, end))
        crash_point("harvest.shard_write")  # killed with the write in flight
        self.position = end
        while len(self.in_flight) > self.max_in_flight:
            self._wait_oldest()
        if self.position < self.stop:
            self._new_buffer()

    def _wait_oldest(self) -> None:
        """Finish the oldest write; a failure names the array and its rows (TensorStore
        has retried it already), as a `StorageUnavailable` when the network gave out."""
        future, start, end = self.in_flight.popleft()
        try:
            future.result()
        except ValueError as err:
            url = self.array.kvstore.url.rstrip("/")
            raise storage.tensorstore_failure(url, f"write rows [{start}, {end})", err) from None

    def close(self) -> None:
        if self.position != self.stop:
            raise RuntimeError(f"unit ended at row {self.position + self.filled}, expected {self.stop}")
        while self.in_flight:
            self._wait_oldest()


def activation_schema(width: int, dtype: str) -> pa.Schema:
    """Parquet activations: raw bfloat16 bits as uint16, or float32, one list per row."""
    value = pa.uint16() if dtype == "bfloat16" else pa.float32()
    return pa.schema([pa.field("activation", pa.list_(value, width))])


class ParquetRowWriter:
    def __init__(self, url: str, width: int, dtype: str, expected_rows: int, shard_rows: int):
        self.url, self.width, self.expected = url, width, expected_rows
        self.bits = np.uint16 if dtype == "bfloat16" else np.float32
        self.shard_rows = shard_rows
        handle, self.local = tempfile.mkstemp(suffix=".parquet", prefix=".part-")
        os.close(handle)
        self.writer = pq.ParquetWriter(self.local, activation_schema(width, dtype), **WRITE_OPTIONS)
        self.pending: list[np.ndarray] = []
        self.rows = 0
        self.crc32c = 0

    def append(self, kept: KeptRows) -> None:
        rows = kept.gathered()
        self.crc32c = extend_crc32c(self.crc32c, rows)
        self.pending.append(np.ascontiguousarray(rows).view(self.bits))
        self.rows += len(rows)
        if sum(len(p) for p in self.pending) >= self.shard_rows:
            self._write()

    def _write(self) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending)
        values = pa.array(block.reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.width)
        self.writer.write_table(pa.table({"activation": column}), row_group_size=self.shard_rows)
        self.pending = []

    def close(self) -> None:
        if self.rows != self.expected:
            raise RuntimeError(f"unit wrote {self.rows} rows, expected {self.expected}")
        self._write()
        self.writer.close()
        try:
            storage.publish_local_file(self.local, self.url)
        finally:
            if os.path.exists(self.local):
                os.remove(self.local)
