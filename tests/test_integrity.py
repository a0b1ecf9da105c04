"""Damaged files are detected and named: activation chunks, token tables, checkpoints, params.npz."""

from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest

from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import load_params_npz, params_npz_bytes
from gemmascope.store import ActivationStore, paths
from gemmascope.store.parquet_io import read_parquet, write_parquet_atomic
from gemmascope.train.checkpoints import MANIFEST, Checkpoints
from tests.harvest_helpers import cli
from tests.train_helpers import gaussian_store, job_id, small_config, write_yaml


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def store_dir(tmp_path) -> Path:
    gaussian_store(tmp_path, n_rows=8192, d_in=32, unit_rows=2048, shard_rows=1024, chunk_rows=256)
    return tmp_path


def shard_file(run_dir: Path, shard: int) -> Path:
    return run_dir / "activations" / "res" / "layer_0" / "c" / str(shard) / "0"


def test_ledger_records_each_units_checksum_and_verify_recomputes_it(store_dir):
    store = ActivationStore.open(str(store_dir))
    assert store.verify() == 4  # 4 units x 1 array
    unit = store.ledger.committed_units[2]
    rows = store.read("res", 0, 4096, 6144)
    assert unit["crc32c"]["res/layer_0"] == google_crc32c.value(rows.astype("<f4").tobytes())
    # A ledger whose record disagrees with the rows: verify names the array, unit and ledger.
    ledger = store_dir / "activations" / "ledger.json"
    data = json.loads(ledger.read_text())
    data["units"]["2"]["crc32c"]["res/layer_0"] ^= 1
    ledger.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"res/layer_0: rows \[4096, 6144\) of unit 2 do not match the checksum"):
        ActivationStore.open(str(store_dir)).verify()


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_damaged_shard_fails_reads_with_its_file_name(store_dir, damage):
    target = shard_file(store_dir, 3)
    if damage == "bit flip":
        flip_byte(target, 1000)  # inside the first inner chunk's data
    else:
        target.write_bytes(target.read_bytes()[:5000])
    store = ActivationStore.open(str(store_dir))
    assert store.read("res", 0, 0, 3072).shape == (3072, 32)  # the other shards still read
    with pytest.raises(UserError, match=f"{target}"):
        store.read("res", 0, 3072, 4096)
    with pytest.raises(UserError, match=f"{target}"):
        store.read_blocks("res", 0, [(0, 256), (3072, 3328)])
    with pytest.raises(UserError, match=f"{target}"):
        store.verify()


def test_training_refuses_a_damaged_store_with_one_line(store_dir, tmp_path):
    config = small_config(store_dir, steps=40, batch=256, shuffle_rows=1024)
    path = write_yaml(config, tmp_path / "config.yaml")
    flip_byte(shard_file(store_dir, 5), 2000)
    result = cli("train", path, "--job", job_id(config), "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("gemmascope: error: ") and str(shard_file(store_dir, 5)) in last
    assert not list((store_dir / "train").glob("*/saes/*/params.npz")), "nothing may be released"


def test_damaged_token_table_is_named(store_dir):
    url = paths.tokens_url(str(store_dir / "activations"), 1)
    table = read_parquet(url)
    assert table.num_rows == 2048
    flip_byte(Path(url), 200)
    with pytest.raises(UserError, match=f"{url}: damaged Parquet file"):
        read_parquet(url)


def test_parquet_page_checksums_catch_a_flip_in_the_values(tmp_path):
    url = str(tmp_path / "t.parquet")
    values = np.random.default_rng(0).normal(size=10_000)  # incompressible: stored as literal bytes
    write_parquet_atomic(url, pa.table({"x": values}))
    # A flip that still decodes (one value changes): only the page checksum can notice.
    flip_byte(Path(url), Path(url).read_bytes().index(values[5000].tobytes()) + 3)
    with pytest.raises(UserError, match="damaged Parquet file"):
        read_parquet(url)


def _state(value: float) -> dict:
    return {"w": jnp.full((64, 32), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_checkpoint_manifest_detects_damage_and_uncommitted_steps(tmp_path):
    url = str(tmp_path / "checkpoints")
    checkpoints = Checkpoints(url, keep=3)
    for step in (1, 2):
        checkpoints.save(step, _state(step), {"step": step})
    checkpoints.close()
    # Step 2 as a kill between Orbax's rename and the manifest leaves it: not committed.
    os.remove(tmp_path / "checkpoints" / "2" / MANIFEST)
    reopened = Checkpoints(url, keep=3)
    assert reopened.latest_step == 1
    state, meta = reopened.restore(jax.tree.map(jnp.zeros_like, _state(0)))
    assert meta == {"step": 1} and float(state["w"][0, 0]) == 1.0
    # A flipped bit in any file of the committed step: the restore names that file.
    files = sorted(p for p in (tmp_path / "checkpoints" / "1").rglob("*") if p.is_file() and p.name != MANIFEST)
    biggest = max(files, key=lambda p: p.stat().st_size)
    flip_byte(biggest, biggest.stat().st_size // 2)
    with pytest.raises(UserError, match=f"{biggest}: checkpoint file damaged"):
        reopened.restore(jax.tree.map(jnp.zeros_like, _state(0)))
    reopened.close()


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_damaged_params_npz_is_named(tmp_path, damage):
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": rng.normal(size=16),
              "b_dec": rng.normal(size=8), "threshold": rng.uniform(size=16)}
    path = tmp_path / "params.npz"
    path.write_bytes(params_npz_bytes({k: v.astype(np.float32) for k, v in arrays.items()}))
    assert np.array_equal(load_params_npz(str(path))["W_dec"], arrays["W_dec"].astype(np.float32))
    if damage == "bit flip":
        data = path.read_bytes()
        flip_byte(path, data.index(arrays["W_dec"].astype(np.float32).tobytes()) + 40)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{path}: not a params.npz"):
        load_params_npz(str(path))
