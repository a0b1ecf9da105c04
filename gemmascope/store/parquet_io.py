"""Parquet files of the store (token tables, packed sequences, Parquet activations):
published atomically, written with page checksums and read with them verified, so a
damaged file fails with its name instead of feeding wrong rows downstream."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from gemmascope import storage
from gemmascope.errors import UserError

# Every writer of the store's Parquet files passes these; readers go through `read_parquet`.
WRITE_OPTIONS = {"write_page_checksum": True}


def write_parquet_atomic(url: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **WRITE_OPTIONS)
    storage.write_bytes_atomic(url, buffer.getvalue())


def read_parquet(url: str) -> pa.Table:
    """The whole table; the bytes are fetched first (with the storage layer's retries and
    errors), so a failure while decoding them can only mean a damaged file."""
    data = storage.read_bytes(url)
    try:
        return pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{url}: damaged Parquet file ({err})") from None
