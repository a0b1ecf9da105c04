"""Write an activation store from arrays in memory: synthetic data for tests and benchmarks.

The result is indistinguishable to readers from a harvested store (same ledger, arrays
and token table), so the trainer, loader and benchmarks can run on data with a known
structure, e.g. sparse combinations of a known dictionary.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gemmascope import storage
from gemmascope.store import paths
from gemmascope.store.arrays import create_array, open_array
from gemmascope.store.layout import Layout, ShardStats
from gemmascope.store.ledger import FORMAT, HarvestLedger
from gemmascope.store.parquet_io import write_parquet_atomic
from gemmascope.store.writers import extend_crc32c


def write_store(run_dir: str, arrays: dict[tuple[str, int], np.ndarray], *, dtype: str = "float32",
                unit_rows: int = 8192, shard_rows: int = 2048, chunk_rows: int = 512) -> str:
    """Write `arrays` ((site, layer) -> [n_rows, d_in]) as a complete store; its activations URL."""
    activations = paths.activations_url(run_dir)
    n_rows = {len(a) for a in arrays.values()}
    if len(n_rows) != 1:
        raise ValueError("every array needs the same number of rows")
    (n,) = n_rows
    widths = {a.shape[1] for a in arrays.values()}
    if len(widths) != 1:
        raise ValueError("every array needs the same d_in (a synthetic model has one width)")
    (d_in,) = widths
    model = {"name": "synthetic", "family": "synthetic", "n_layers": max(layer for _, layer in arrays) + 1,
             "d_model": d_in, "n_heads": 1, "head_dim": d_in, "vocab_size": 0}
    layout = Layout((ShardStats(n_sequences=n, n_rows=n, n_documents=1, n_tokens=n),), n, unit_rows)
    stored = {}
    for (site, layer), values in arrays.items():
        url = paths.array_url(activations, site, layer)
        create_array(url, n_rows=n, d_in=values.shape[1], dtype=dtype, shard_rows=shard_rows,
                     chunk_rows=chunk_rows)
        stored[paths.array_key(site, layer)] = values.astype(open_array(url).dtype.numpy_dtype)
        open_array(url, write=True)[:].write(stored[paths.array_key(site, layer)]).result()
    units = {}
    for unit in range(layout.n_units):
        start, stop = layout.unit_range(unit)
        units[str(unit)] = {"rows": [start, stop],
                            "crc32c": {key: extend_crc32c(0, values[start:stop]) for key, values in stored.items()}}
        rows = np.arange(start, stop, dtype=np.int64)
        table = pa.table({"row": rows, "sequence": rows, "position": np.zeros(len(rows), np.int32),
                          "token": np.zeros(len(rows), np.int32), "document": np.zeros(len(rows), np.int64)})
        write_parquet_atomic(paths.tokens_url(activations, unit), table)
    ledger = HarvestLedger(paths.ledger_url(activations), {
        "format": FORMAT, "fingerprint": "synthetic", "identity": {"synthetic": True},
        "model": model,
        "arrays": [{"site": site, "layer": layer, "d_in": int(a.shape[1])}
                   for (site, layer), a in arrays.items()],
        "storage": {"format": "zarr3", "dtype": dtype, "unit_rows": unit_rows, "shard_rows": shard_rows,
                    "chunk_rows": chunk_rows, "context_length": 0},
        "shards": {"0": layout.shards[0].__dict__.copy()}, "layout": layout.to_json(),
        "units": units,
        "complete": True,
    })
    storage.makedirs(activations)
    ledger.save()
    return activations


def sparse_dictionary_data(n_rows: int, d_in: int, n_atoms: int, active: int, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Rows that are non-negative sparse combinations of `n_atoms` unit-norm atoms; (rows, atoms)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d_in))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n_rows, n_atoms))
    for row in range(n_rows):
        chosen = rng.choice(n_atoms, size=active, replace=False)
        codes[row, chosen] = rng.uniform(0.5, 1.5, size=active)
    return (codes @ atoms).astype(np.float32), atoms.astype(np.float32)
