"""The harvest's row writers against numpy: kept positions gathered straight into shard
buffers land in the right rows of a real zarr3 array, across shard boundaries, with the
unit's crc32c of exactly the stored bytes."""

from __future__ import annotations

import google_crc32c
import ml_dtypes
import numpy as np
import pytest

from gemmascope.models.backends import KeptRows
from gemmascope.store.arrays import create_array, open_array
from gemmascope.store.writers import ZarrRowWriter

WIDTH, SHARD_ROWS = 24, 16


def _batches(rng: np.random.Generator, n_batches: int, dtype) -> list[KeptRows]:
    """Forward outputs of 3 x 8 positions each; a random subset of positions kept."""
    batches = []
    for _ in range(n_batches):
        positions = rng.standard_normal((24, WIDTH)).astype(dtype)
        index = np.flatnonzero(rng.random(24) < 0.7)
        batches.append(KeptRows(positions, index))
    return batches


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gathered_rows_land_in_order_across_shards(tmp_path, dtype):
    numpy_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    rng = np.random.default_rng(0)
    batches = _batches(rng, 7, numpy_dtype) + [KeptRows(rng.standard_normal((5, WIDTH)).astype(numpy_dtype))]
    want = np.concatenate([b.positions if b.index is None else b.positions[b.index] for b in batches])
    start, n_rows = 2 * SHARD_ROWS, 2 * SHARD_ROWS + len(want)
    url = str(tmp_path / "array")
    create_array(url, n_rows=n_rows + SHARD_ROWS, d_in=WIDTH, dtype=dtype, shard_rows=SHARD_ROWS, chunk_rows=4)

    writer = ZarrRowWriter(open_array(url, write=True), start, n_rows, SHARD_ROWS)
    for batch in batches:
        writer.append(batch)
    writer.close()

    stored = np.asarray(open_array(url)[start:n_rows].read().result())
    assert stored.dtype == numpy_dtype
    np.testing.assert_array_equal(stored.view(np.uint8), want.view(np.uint8))
    assert writer.crc32c == google_crc32c.value(want.tobytes())
    assert not np.asarray(open_array(url)[:start].read().result()).any()  # rows before the unit untouched


def test_a_unit_that_ends_short_is_refused(tmp_path):
    url = str(tmp_path / "array")
    create_array(url, n_rows=64, d_in=WIDTH, dtype="float32", shard_rows=SHARD_ROWS, chunk_rows=4)
    writer = ZarrRowWriter(open_array(url, write=True), 0, 40, SHARD_ROWS)
    writer.append(KeptRows(np.ones((30, WIDTH), np.float32), np.arange(30)))
    with pytest.raises(RuntimeError, match="unit ended at row 30, expected 40"):
        writer.close()
