"""The work a harvest worker does: tokenise a source shard, harvest a unit of rows.

Plain Python (the Ray actor in `actors.py` wraps it, the benchmark calls it directly).
A unit's rows are fixed by the layout, so running a unit twice writes the same bytes to
the same places: that is what makes retries and resumes safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from gemmascope.config import Config, harvest_keys
from gemmascope.faults import crash_point
from gemmascope.harvest.packing import ROLE_TEXT, tokenize_and_pack
from gemmascope.harvest.sources import SourceShard, read_documents
from gemmascope.models.backends import ForwardBackend, open_backend
from gemmascope.models.loading import model_info
from gemmascope.store import paths
from gemmascope.store.arrays import open_array
from gemmascope.store.layout import Layout, ShardStats
from gemmascope.store.parquet_io import write_parquet_atomic
from gemmascope.store.sequences import overlapping_sequences, read_sequences, write_sequences
from gemmascope.store.writers import ParquetRowWriter, ZarrRowWriter


@dataclass(frozen=True)
class UnitResult:
    unit: int
    rows: int
    sequences: int
    seconds: float
    checksums: dict[str, int]  # "site/layer_L" -> crc32c of the unit's rows as stored


class HarvestWorker:
    def __init__(self, config: Config, activations: str, backend: ForwardBackend | None = None):
        self.config = config
        self.activations = activations
        n_layers = backend.info.n_layers if backend else model_info(config.model).n_layers
        self.keys = tuple(harvest_keys(config.harvest, n_layers))
        self.backend = backend or open_backend(config.model, last_layer=max(layer for _, layer in self.keys))
        self._sequences = lru_cache(maxsize=4)(read_sequences)

    # Phase 1 ---------------------------------------------------------------------
    def tokenize_shard(self, shard: SourceShard) -> ShardStats:
        texts = list(read_documents(shard, self.config.source.text_field))
        packed = tokenize_and_pack(self.backend.tokenizer, texts, self.config.harvest.context_length)
        write_sequences(paths.sequences_url(self.activations, shard.index), packed)
        return ShardStats(
            n_sequences=len(packed.input_ids),
            n_rows=int(packed.rows_per_sequence.sum()),
            n_documents=packed.n_documents,
            n_tokens=int(packed.input_ids.size),
        )

    # Phase 2 ---------------------------------------------------------------------
    def unit_sequences(self, layout: Layout, start: int, stop: int):
        """The packed sequences with rows in [start, stop) (see `overlapping_sequences`)."""
        return overlapping_sequences(self.activations, layout, start, stop, self._sequences)

    def _make_writers(self, unit: int, start: int, stop: int) -> dict:
        h, info = self.config.harvest, self.backend.info
        writers = {}
        for key in self.keys:
            if h.output_format == "zarr3":
                array = open_array(paths.array_url(self.activations, *key), write=True, io=self.config.storage)
                writers[key] = ZarrRowWriter(array, start, stop, h.shard_rows)
            else:
                width = info.site_width(key[0])
                writers[key] = ParquetRowWriter(paths.parquet_part_url(self.activations, *key, unit),
                                                width, h.store_dtype, stop - start, h.shard_rows)
        return writers

    def harvest_unit(self, unit: int, layout: Layout) -> UnitResult:
        began = time.perf_counter()
        start, stop = layout.unit_range(unit)
        writers = self._make_writers(unit, start, stop)
        token_columns: dict[str, list[np.ndarray]] = {k: [] for k in ("row", "sequence", "position", "token", "document")}
        n_sequences = 0
        batch: list = []

        def launch(batch: list):
            """Start the forward of `batch`; the jax backend returns before it finishes."""
            ids = np.stack([b[1] for b in batch])
            keep = np.stack([b[2] for b in batch]) == ROLE_TEXT
            rows = np.cumsum(keep, axis=1) - 1 + np.array([b[4] for b in batch])[:, None]
            select = keep & (rows >= start) & (rows < stop)
            pending = self.backend.launch(ids, self.keys, np.flatnonzero(select), self.config.harvest.store_dtype)
            return pending, batch, ids, rows, select

        def finish(pending, batch: list, ids: np.ndarray, rows: np.ndarray, select: np.ndarray) -> None:
            for key, rows_of_key in self.backend.collect(pending).items():
                writers[key].append(rows_of_key)
            b_index, position = np.nonzero(select)
            token_columns["row"].append(rows[select])
            token_columns["sequence"].append(np.array([b[0] for b in batch])[b_index])
            token_columns["position"].append(position.astype(np.int32))
            token_columns["token"].append(ids[select])
            token_columns["document"].append(np.stack([b[3] for b in batch])[select].astype(np.int64))

        # One batch in flight: the next forward runs while the last one's rows are copied
        # to the host and handed to the writers.
        in_flight = None
        for item in self.unit_sequences(layout, start, stop):
            batch.append(item)
            n_sequences += 1
            if len(batch) == self.config.harvest.batch_size:
                launched = launch(batch)
                if in_flight:
                    finish(*in_flight)
                in_flight, batch = launched, []
        if batch:
            launched = launch(batch)
            if in_flight:
                finish(*in_flight)
            in_flight = launched
        if in_flight:
            finish(*in_flight)
        for writer in writers.values():
            writer.close()
        crash_point("harvest.unit_arrays_written")
        table = pa.table({k: np.concatenate(v) if v else np.array([], np.int64) for k, v in token_columns.items()})
        if table.num_rows != stop - start or (table.num_rows and table.column("row")[0].as_py() != start):
            raise RuntimeError(f"unit {unit}: produced {table.num_rows} rows for [{start}, {stop})")
        write_parquet_atomic(paths.tokens_url(self.activations, unit), table)
        checksums = {paths.array_key(*key): writer.crc32c for key, writer in writers.items()}
        return UnitResult(unit, stop - start, n_sequences, time.perf_counter() - began, checksums)

