"""TensorStore zarr3 arrays of activations: `[n_rows, d_in]`, one storage shard per `shard_rows`.

The sharding codec packs `chunk_rows`-row inner chunks into one object per shard:
few large objects for GCS, and random reads of single chunks through the shard index.
No compression by default: activations barely compress and CPU time is the bottleneck.
Every inner chunk and every shard index carries a crc32c, which TensorStore checks on
each read: a flipped bit or a truncated shard fails the read (TensorStore names the
object) instead of reaching the trainer.

Request parallelism comes from `StorageConfig` (`storage.gcs_request_concurrency`,
`storage.file_io_concurrency`) through a TensorStore context that is a child of the
process-wide one in `gemmascope.storage`: it overrides only the concurrency limits and
inherits everything else (retry schedule, cache pool, memory:// stores).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import ml_dtypes
import numpy as np

from gemmascope import storage
from gemmascope.config import StorageConfig
from gemmascope.errors import UserError

NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def zarr_spec(url: str, *, n_rows: int, d_in: int, dtype: str, shard_rows: int, chunk_rows: int) -> dict:
    return {
        "driver": "zarr3",
        "kvstore": storage.tensorstore_kvstore(url),
        "metadata": {
            "shape": [n_rows, d_in],
            "data_type": dtype,
            "dimension_names": ["row", "feature"],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, d_in]}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [chunk_rows, d_in],
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                },
            }],
            "fill_value": 0,
        },
    }


def context_spec(io: StorageConfig | None = None) -> dict:
    """The TensorStore context resources `io` sets (the defaults when None)."""
    io = io or StorageConfig()
    spec: dict = {"gcs_request_concurrency": {"limit": io.gcs_request_concurrency}}
    if io.file_io_concurrency is not None:
        spec["file_io_concurrency"] = {"limit": io.file_io_concurrency}
    return spec


def context(io: StorageConfig | None = None) -> Any:
    """The TensorStore context for store arrays under `io`'s concurrency limits."""
    io = io or StorageConfig()
    return _context(io.gcs_request_concurrency, io.file_io_concurrency)


@lru_cache(maxsize=8)
def _context(gcs_limit: int, file_limit: int | None) -> Any:
    """One child context per limits: arrays opened with the same limits share its request
    queue, so the limit holds for the whole process, not per array."""
    import tensorstore as ts

    io = StorageConfig(gcs_request_concurrency=gcs_limit, file_io_concurrency=file_limit)
    return ts.Context(ts.Context.Spec(context_spec(io)), storage.tensorstore_context())


def create_array(url: str, *, io: StorageConfig | None = None, **layout: Any) -> None:
    """Create the array, or check that an existing one has exactly this layout."""
    import tensorstore as ts

    spec = zarr_spec(url, **layout)
    try:
        ts.open(spec, create=True, open=True, context=context(io)).result()
    except ValueError as err:
        if storage.is_transient(err):
            raise storage.tensorstore_failure(url, "create the activation array", err) from None
        raise UserError(f"{url}: existing array does not match the harvest layout ({storage.describe_error(err)})") from None


def open_array(url: str, *, write: bool = False, io: StorageConfig | None = None) -> Any:
    """Open an existing array; `io` sets its request parallelism (None: the defaults)."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": storage.tensorstore_kvstore(url)}
    try:
        return ts.open(spec, open=True, read=True, write=write, context=context(io)).result()
    except ValueError as err:
        raise storage.tensorstore_failure(url, "open the activation array", err) from None
