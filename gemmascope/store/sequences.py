"""Packed token sequences of the store (RUN/activations/sequences/shard-S.parquet).

Each source shard's sequences are stored whole, BOS, EOS and padding included, with
each position's role and document; the activation rows are their TEXT positions in
order. The harvest reads them to run the model; evaluation reads the held-out ones
again to splice SAEs into the same forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from gemmascope.harvest.packing import PackedSequences
from gemmascope.store import paths
from gemmascope.store.layout import Layout
from gemmascope.store.parquet_io import read_parquet, write_parquet_atomic


def _fixed_lists(array: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])


def write_sequences(url: str, packed: PackedSequences) -> None:
    write_parquet_atomic(url, pa.table({
        "input_ids": _fixed_lists(packed.input_ids),
        "document": _fixed_lists(packed.document),
        "role": _fixed_lists(packed.role),
    }))


def read_sequences(url: str) -> PackedSequences:
    table = read_parquet(url)
    columns = {}
    for name in ("input_ids", "document", "role"):
        column = table.column(name).combine_chunks()
        width = column.type.list_size
        columns[name] = column.values.to_numpy(zero_copy_only=False).reshape(-1, width)
    n_documents = int(columns["document"].max()) + 1 if columns["document"].size else 0
    return PackedSequences(columns["input_ids"], columns["document"], columns["role"], n_documents)


def overlapping_sequences(activations: str, layout: Layout, start: int, stop: int,
                          read: Callable[[str], PackedSequences] = read_sequences,
                          ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]:
    """(global sequence id, ids, role, document ids, first row) of every sequence with rows in [start, stop)."""
    row_offsets, seq_offsets, doc_offsets = layout.row_offsets, layout.sequence_offsets, layout.document_offsets
    for shard in layout.shards_of_rows(start, stop):
        packed = read(paths.sequences_url(activations, shard))
        first_rows = row_offsets[shard] + np.concatenate([[0], np.cumsum(packed.rows_per_sequence)[:-1]])
        last_rows = first_rows + packed.rows_per_sequence
        for s in np.flatnonzero((first_rows < stop) & (last_rows > start)):
            document = np.where(packed.document[s] >= 0, packed.document[s] + doc_offsets[shard], -1)
            yield (int(seq_offsets[shard] + s), packed.input_ids[s], packed.role[s], document, int(first_rows[s]))
