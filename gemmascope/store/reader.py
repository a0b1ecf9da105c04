"""Read a harvested activation store: committed rows only, sequential or by random blocks.

The trainer's loader reads `chunk_rows`-row blocks in a shuffled order; analysis code
reads row ranges and joins them with the token table. Rows outside committed units
(an unfinished harvest) are refused rather than returned as zeros.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pyarrow as pa

from gemmascope import storage
from gemmascope.config import StorageConfig
from gemmascope.errors import UserError
from gemmascope.models.loading import ModelInfo
from gemmascope.store import paths
from gemmascope.store.arrays import NUMPY_DTYPES, open_array
from gemmascope.store.layout import Layout
from gemmascope.store.ledger import HarvestLedger
from gemmascope.store.parquet_io import read_parquet
from gemmascope.store.writers import extend_crc32c

Key = tuple[str, int]


class ActivationStore:
    def __init__(self, activations: str, ledger: HarvestLedger, io: StorageConfig | None = None):
        self.url = activations
        self.io = io  # request parallelism of zarr3 reads (None: StorageConfig's defaults)
        self.ledger = ledger
        storage_info = ledger.data["storage"]
        self.format: str = storage_info["format"]
        self.dtype_name: str = storage_info["dtype"]
        self.dtype = NUMPY_DTYPES[self.dtype_name]
        self.chunk_rows: int = storage_info["chunk_rows"]
        self.d_in: dict[Key, int] = {(a["site"], a["layer"]): a["d_in"] for a in ledger.data["arrays"]}
        self._arrays: dict[Key, object] = {}

    @classmethod
    def open(cls, location: str, io: StorageConfig | None = None) -> ActivationStore:
        """Open from a run directory or its `activations/` directory; `io` (a config's
        `storage` section) sets TensorStore's request parallelism."""
        location = storage.normalize(location)
        candidates = [location] if location.endswith("/activations") else [paths.activations_url(location), location]
        for candidate in candidates:
            if storage.exists(paths.ledger_url(candidate)):
                return cls(candidate, HarvestLedger.read(candidate), io)
        raise UserError(f"{location}: no activation store (no activations/ledger.json)")

    # What is there -------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        """The shape of the model that made this store, as recorded by the harvest."""
        return ModelInfo(**self.ledger.data["model"])

    @property
    def keys(self) -> list[Key]:
        return sorted(self.d_in)

    @property
    def layout(self) -> Layout:
        layout = self.ledger.layout
        if layout is None:
            raise UserError(f"{self.ledger.url}: the harvest has not laid out any rows yet")
        return layout

    @property
    def complete(self) -> bool:
        return self.ledger.complete

    @cached_property
    def committed_ranges(self) -> list[tuple[int, int]]:
        layout = self.layout
        return [layout.unit_range(u) for u in sorted(self.ledger.committed_units)]

    @property
    def n_rows(self) -> int:
        """Committed rows (all rows once the harvest is complete)."""
        return sum(stop - start for start, stop in self.committed_ranges)

    def _check(self, key: Key, start: int, stop: int) -> None:
        if key not in self.d_in:
            raise UserError(f"{self.url}: no array for site {key[0]!r} layer {key[1]} (have {self.keys})")
        if not 0 <= start <= stop:
            raise ValueError(f"bad row range [{start}, {stop})")
        covered = start
        for a, b in self.committed_ranges:
            if a <= covered < b:
                covered = b
        if covered < stop:
            raise UserError(f"{self.url}: rows [{start}, {stop}) are not all committed (row {covered} is not)")

    # Reading ---------------------------------------------------------------------
    def _array(self, key: Key):
        if key not in self._arrays:
            self._arrays[key] = open_array(paths.array_url(self.url, *key), io=self.io)
        return self._arrays[key]

    def read(self, site: str, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array, in the store's dtype."""
        key = (site, layer)
        self._check(key, start, stop)
        if self.format == "zarr3":
            return self._zarr_result(key, start, stop, self._array(key)[start:stop].read())
        return self._read_parquet(key, start, stop)

    def _zarr_result(self, key: Key, start: int, stop: int, future) -> np.ndarray:
        try:
            return future.result()
        except ValueError as err:  # TensorStore's DATA_LOSS and I/O failures
            raise storage.tensorstore_failure(paths.array_url(self.url, *key), f"read rows [{start}, {stop})",
                                              err) from None

    def _read_parquet(self, key: Key, start: int, stop: int) -> np.ndarray:
        layout = self.layout
        out = np.empty((stop - start, self.d_in[key]), dtype=self.dtype)
        bits = np.uint16 if self.dtype_name == "bfloat16" else np.float32
        for unit in range(start // layout.unit_rows, -(-stop // layout.unit_rows)):
            unit_start, unit_stop = layout.unit_range(unit)
            lo, hi = max(start, unit_start), min(stop, unit_stop)
            url = paths.parquet_part_url(self.url, key[0], key[1], unit)
            table = read_parquet(url).slice(lo - unit_start, hi - lo)
            values = table.column("activation").combine_chunks().values.to_numpy(zero_copy_only=False)
            out[lo - start:hi - start] = values.astype(bits, copy=False).view(self.dtype).reshape(hi - lo, -1)
        return out

    def verify(self, progress: bool = False) -> int:
        """Re-read every committed row and check it against the crc32c the ledger recorded
        when its unit was written; the number of (unit, array) pairs checked. A mismatch
        is a `UserError` naming the array and the rows."""
        from tqdm import tqdm

        checked = 0
        units = self.ledger.committed_units
        layout = self.layout
        with tqdm(total=len(units) * len(self.keys), desc="verify", disable=not progress) as bar:
            for unit, info in sorted(units.items()):
                start, stop = layout.unit_range(unit)
                for key in self.keys:
                    expected = info.get("crc32c", {}).get(paths.array_key(*key))
                    if expected is not None:
                        if extend_crc32c(0, self.read(*key, start, stop)) != expected:
                            raise UserError(f"{paths.array_url(self.url, *key)}: rows [{start}, {stop}) of unit "
                                            f"{unit} do not match the checksum in {self.ledger.url}")
                        checked += 1
                    bar.update()
        return checked

    def blocks(self, stop_row: int | None = None) -> list[tuple[int, int]]:
        """Committed rows (below `stop_row`, if given) cut into `chunk_rows` blocks, the
        unit of random reads."""
        limit = self.layout.n_rows if stop_row is None else stop_row
        return [
            (b, min(b + self.chunk_rows, stop, limit))
            for start, stop in self.committed_ranges
            for b in range(start, min(stop, limit), self.chunk_rows)
        ]

    def read_blocks(self, site: str, layer: int, blocks: list[tuple[int, int]]) -> list[np.ndarray]:
        """Several blocks at once; zarr3 reads are issued concurrently."""
        if self.format != "zarr3":
            return [self.read(site, layer, a, b) for a, b in blocks]
        key = (site, layer)
        for a, b in blocks:
            self._check(key, a, b)
        array = self._array(key)
        futures = [array[a:b].read() for a, b in blocks]
        return [self._zarr_result(key, a, b, f) for (a, b), f in zip(blocks, futures, strict=True)]

    def token_table(self) -> pa.Table:
        """Row -> (sequence, position, token, document) for every committed row, in row order."""
        tables = []
        for unit in sorted(self.ledger.committed_units):
            tables.append(read_parquet(paths.tokens_url(self.url, unit)))
        if not tables:
            return pa.table({"row": pa.array([], pa.int64())})
        return pa.concat_tables(tables)
