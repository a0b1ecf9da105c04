"""Publishing Parquet tables atomically (token tables, packed sequences)."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from gemmascope import storage


def write_parquet_atomic(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(url, buffer.getvalue())


def read_parquet(url: str) -> pa.Table:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)
