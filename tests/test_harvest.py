"""End-to-end harvests on a real local Ray cluster: contents, crashes, gs://, bad input."""

from __future__ import annotations

import signal
import time

import numpy as np
import psutil
import pytest
import torch

from gemmascope.config import ModelConfig, load_config
from gemmascope.errors import UserError
from gemmascope.harvest.driver import run_harvest
from gemmascope.harvest.packing import ROLE_TEXT
from gemmascope.models.capture import ActivationCapture
from gemmascope.models.loading import load_model
from gemmascope.store import ActivationStore, paths
from gemmascope.store.sequences import read_sequences
from tests.harvest_helpers import ROOT, cli, snapshot, start_cli, wait_for_units

pytestmark = pytest.mark.ray

TINY = str(ROOT / "configs" / "tiny-gemma2.yaml")
# Enough units that a kill lands mid-run: 120k rows in 59 units of 2,048.
LONG = ["harvest.max_tokens=120000", "harvest.unit_rows=2048"]


def tiny_config(run_dir, *overrides):
    return load_config(TINY, [f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def reference_long(ray_address, tmp_path_factory):
    """An uninterrupted harvest of the LONG config: what every crashed run must equal."""
    run_dir = tmp_path_factory.mktemp("reference-long")
    run_harvest(tiny_config(run_dir, *LONG), progress=False)
    return snapshot(str(run_dir))


def check_matches_capture(run_dir, threads: int) -> None:
    """Stored rows are the captured tensors bit for bit; the token table lines up."""
    store = ActivationStore.open(str(run_dir))
    source = store.ledger.data["identity"]["model"]["source"]
    batch_size = store.ledger.data["identity"]["harvest"]["batch_size"]
    loaded = load_model(ModelConfig(source=source))
    sequences = read_sequences(paths.sequences_url(store.url, 0))
    ids = sequences.input_ids[:batch_size]
    keep = sequences.role[:batch_size] == ROLE_TEXT
    n = int(keep.sum())
    assert n <= store.layout.unit_rows and n <= store.layout.n_rows
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        captured = ActivationCapture(loaded, store.keys)(torch.from_numpy(ids.astype(np.int64)))
    finally:
        torch.set_num_threads(previous)
    torch_dtype = torch.bfloat16 if store.dtype_name == "bfloat16" else torch.float32
    for key in store.keys:
        expected = captured[key][torch.from_numpy(keep)].to(torch_dtype)
        expected_bits = expected.view(torch.int16 if torch_dtype == torch.bfloat16 else torch.int32).numpy()
        stored = store.read(*key, 0, n)
        stored_bits = stored.view(np.int16 if torch_dtype == torch.bfloat16 else np.int32)
        assert np.array_equal(stored_bits, expected_bits), key
    table = store.token_table()
    seq_index, position = np.nonzero(keep)
    assert table.column("row").to_numpy()[:n].tolist() == list(range(n))
    assert np.array_equal(table.column("sequence").to_numpy()[:n], seq_index)
    assert np.array_equal(table.column("position").to_numpy()[:n], position)
    assert np.array_equal(table.column("token").to_numpy()[:n], ids[keep])


def check_no_special_positions(run_dir) -> None:
    """Every stored row is a text position; every text position of the used sequences is stored."""
    store = ActivationStore.open(str(run_dir))
    table = store.token_table()
    assert table.num_rows == store.layout.n_rows
    assert np.array_equal(table.column("row").to_numpy(), np.arange(store.layout.n_rows))
    offsets = store.layout.sequence_offsets
    roles, tokens = [], []
    for shard in range(len(store.layout.shards)):
        packed = read_sequences(paths.sequences_url(store.url, shard))
        roles.append(packed.role)
        tokens.append(packed.input_ids)
    roles, tokens = np.concatenate(roles), np.concatenate(tokens)
    assert len(roles) == offsets[-1]
    sequence = table.column("sequence").to_numpy()
    position = table.column("position").to_numpy()
    assert (roles[sequence, position] == ROLE_TEXT).all()
    assert np.array_equal(tokens[sequence, position], table.column("token").to_numpy())
    # BOS, EOS and padding ids never appear in the stored rows' role; all text rows are there.
    text_positions = np.flatnonzero(roles.reshape(-1) == ROLE_TEXT)[: store.layout.n_rows]
    flat = sequence * roles.shape[1] + position
    assert np.array_equal(flat, text_positions)


def test_tiny_gemma2_store_contents(ray_address, tmp_path):
    run_dir = tmp_path / "tiny"
    summary = run_harvest(tiny_config(run_dir), progress=False)
    store = ActivationStore.open(str(run_dir))
    assert store.complete and summary.rows == 6000 == store.n_rows
    assert len(store.keys) == 16  # 4 sites x 4 layers
    assert store.d_in[("att", 0)] == 4 * 16 and store.d_in[("res", 3)] == 64
    check_matches_capture(run_dir, threads=1)
    check_no_special_positions(run_dir)
    assert store.verify() == len(store.ledger.committed_units) * 16  # every unit's crc32c, every array
    blocks = store.blocks()
    assert blocks[0] == (0, 128) and blocks[-1][1] == 6000
    read = store.read_blocks("res", 2, blocks[3:5])
    assert np.array_equal(np.concatenate(read), store.read("res", 2, blocks[3][0], blocks[4][1]))
    # A rerun of a complete harvest does nothing and changes nothing.
    before = snapshot(str(run_dir))
    assert run_harvest(tiny_config(run_dir), progress=False).units_run == 0
    assert snapshot(str(run_dir)) == before


def test_gemma3_270m_store_contents(ray_address, tmp_path):
    run_dir = tmp_path / "gemma3"
    config = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"run_dir={run_dir}", "harvest.sites=[res,mlp,att,mlp_in]", "harvest.layers=[0,9,17]",
        "harvest.context_length=64", "harvest.max_tokens=1500", "harvest.unit_rows=1024",
        "harvest.shard_rows=512", "harvest.chunk_rows=128", "source.pieces_per_shard=1"])
    run_harvest(config, progress=False)
    store = ActivationStore.open(str(run_dir))
    assert store.n_rows == 1500 and store.d_in[("att", 9)] == 1024 and store.d_in[("res", 17)] == 640
    check_matches_capture(run_dir, threads=2)
    check_no_special_positions(run_dir)


def kill_driver_after(run_dir, ray_address: str, units: int) -> list[str]:
    """Start the LONG harvest, SIGKILL its driver once `units` units are committed; its args."""
    args = ["harvest", TINY, f"run_dir={run_dir}", *LONG, "--ray-address", ray_address, "--no-progress"]
    process = start_cli(*args)
    wait_for_units(run_dir, process, at_least=units)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return args


@pytest.mark.slow  # the default suite kills the driver at a ledger commit (tests/test_chaos.py)
def test_driver_killed_mid_run_resumes_to_identical_store(reference_long, ray_address, tmp_path):
    run_dir = tmp_path / "killed-driver"
    args = kill_driver_after(run_dir, ray_address, units=3)
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    units_run = int(rerun.stdout.split("(")[1].split(" units run now")[0])
    assert 0 < units_run < len(reference_long["units"])
    assert snapshot(str(run_dir)) == reference_long


def test_worker_killed_mid_run_is_retried_to_identical_store(reference_long, ray_address, tmp_path):
    run_dir = tmp_path / "killed-worker"
    process = start_cli("harvest", TINY, f"run_dir={run_dir}", *LONG, "--ray-address", ray_address,
                        "--no-progress")
    wait_for_units(run_dir, process, at_least=2)
    actors = [p for p in psutil.process_iter(["cmdline"])
              if "HarvestActor.harvest_unit" in " ".join(p.info["cmdline"] or [])]
    assert actors, "no busy harvest actor found"
    actors[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "failed (attempt 1/" in err, "the killed actor's unit was not retried"
    assert time.monotonic() > killed_at
    assert snapshot(str(run_dir)) == reference_long


def test_gcs_round_trip_matches_local(ray_address, gcs_bucket, tmp_path):
    small = ["harvest.max_tokens=3000", "harvest.layers=[1,3]"]
    local_dir, remote_dir = tmp_path / "local", f"{gcs_bucket}/runs/tiny"
    run_harvest(tiny_config(local_dir, *small), progress=False)
    run_harvest(tiny_config(remote_dir, *small), progress=False)
    remote = snapshot(remote_dir)
    assert remote == snapshot(str(local_dir))
    assert ActivationStore.open(remote_dir).url == f"{remote_dir}/activations"


def test_parquet_float32_output_matches_zarr_bfloat16(ray_address, tmp_path):
    import ml_dtypes

    small = ["harvest.max_tokens=3000", "harvest.layers=[0,2]"]
    zarr_dir, parquet_dir = tmp_path / "zarr", tmp_path / "parquet"
    run_harvest(tiny_config(zarr_dir, *small), progress=False)
    run_harvest(tiny_config(parquet_dir, *small, "harvest.output_format=parquet",
                            "harvest.store_dtype=float32"), progress=False)
    zarr, parquet = ActivationStore.open(str(zarr_dir)), ActivationStore.open(str(parquet_dir))
    assert (run := list((parquet_dir / "activations" / "res" / "layer_0").glob("unit-*.parquet")))
    assert len(run) == 2
    for key in zarr.keys:
        as_bf16 = parquet.read(*key, 0, 3000).astype(ml_dtypes.bfloat16)
        assert np.array_equal(as_bf16.view(np.uint16), zarr.read(*key, 0, 3000).view(np.uint16)), key
        assert np.array_equal(parquet.read(*key, 700, 2300), parquet.read(*key, 0, 3000)[700:2300])
    assert parquet.token_table().equals(zarr.token_table())


def test_reader_refuses_uncommitted_rows(reference_long, ray_address, tmp_path):
    run_dir = tmp_path / "partial"
    kill_driver_after(run_dir, ray_address, units=1)

    store = ActivationStore.open(str(run_dir))
    assert not store.complete and 0 < store.n_rows < store.layout.n_rows
    with pytest.raises(UserError, match="not all committed"):
        store.read("res", 0, 0, store.layout.n_rows)
    first = store.committed_ranges[0]
    assert store.read("res", 0, *first).shape == (first[1] - first[0], 64)
