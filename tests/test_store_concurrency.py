"""Store I/O parallelism: storage.* concurrency limits reach TensorStore (local files and
the GCS emulator), the fingerprint ignores them, and the loader and harvest report throughput."""

from __future__ import annotations

import numpy as np
import pytest

from gemmascope import storage
from gemmascope.config import Config, HarvestConfig, StorageConfig
from gemmascope.harvest.driver import HarvestSummary
from gemmascope.store import ActivationStore, arrays
from gemmascope.store.arrays import create_array, open_array
from gemmascope.store.synthetic import write_store
from gemmascope.train.loader import ActivationLoader

LAYOUT = {"n_rows": 4096, "d_in": 16, "dtype": "float32", "shard_rows": 2048, "chunk_rows": 512}


def context_of(array) -> dict:
    return array.spec(retain_context=True).to_json()["context"]


def test_local_limits_reach_tensorstore(tmp_path):
    url = str(tmp_path / "a")
    io = StorageConfig(gcs_request_concurrency=5, file_io_concurrency=3)
    create_array(url, io=io, **LAYOUT)
    array = open_array(url, write=True, io=io)
    assert context_of(array)["file_io_concurrency"] == {"limit": 3}
    values = np.arange(4096 * 16, dtype=np.float32).reshape(4096, 16)
    array[:].write(values).result()
    np.testing.assert_array_equal(open_array(url).read().result(), values)  # defaults open it too


def test_gcs_limits_reach_tensorstore_and_the_emulator_round_trips(gcs_bucket):
    url = storage.join(gcs_bucket, "run", "activations", "res", "layer_0")
    create_array(url, io=StorageConfig(gcs_request_concurrency=5), **LAYOUT)
    array = open_array(url, write=True, io=StorageConfig(gcs_request_concurrency=5))
    context = context_of(array)
    assert context["gcs_request_concurrency"] == {"limit": 5}
    # The child context inherits the retry schedule of the process-wide one.
    retries = arrays.context(StorageConfig(gcs_request_concurrency=5))["gcs_request_retries"].to_json()
    assert retries["max_retries"] == storage.REQUEST_ATTEMPTS
    values = np.random.default_rng(0).normal(size=(4096, 16)).astype(np.float32)
    futures = [array[a:a + 2048].write(values[a:a + 2048]) for a in (0, 2048)]
    for future in futures:
        future.result()
    default = open_array(url)
    assert context_of(default)["gcs_request_concurrency"] == {"limit": 32}
    np.testing.assert_array_equal(default.read().result(), values)


def test_the_store_reads_through_its_configured_context(tmp_path):
    values = np.random.default_rng(1).normal(size=(2048, 8)).astype(np.float32)
    write_store(str(tmp_path), {("res", 0): values})
    store = ActivationStore.open(str(tmp_path), io=StorageConfig(file_io_concurrency=2))
    np.testing.assert_array_equal(np.concatenate(store.read_blocks("res", 0, store.blocks())), values)
    assert context_of(store._array(("res", 0)))["file_io_concurrency"] == {"limit": 2}


def test_memory_stores_stay_shared_across_limits():
    url = "memory://concurrency-shared/a"
    create_array(url, io=StorageConfig(gcs_request_concurrency=7), **LAYOUT)
    assert open_array(url).shape == (4096, 16)  # another context, the same memory store


def test_scheduling_fields_leave_the_harvest_fingerprint_alone():
    base = Config()
    assert base.harvest_fingerprint() == "34c99bae9828945d"  # as before these fields existed
    changed = Config(harvest=HarvestConfig(workers_per_node=8),
                     storage=StorageConfig(gcs_request_concurrency=128, file_io_concurrency=4,
                                           node_write_bandwidth_mib_s=10.0))
    assert changed.harvest_fingerprint() == base.harvest_fingerprint()


@pytest.mark.parametrize("value", [0, -1])
def test_bad_limits_are_rejected(value):
    with pytest.raises(ValueError):
        StorageConfig(gcs_request_concurrency=value)
    with pytest.raises(ValueError):
        StorageConfig(file_io_concurrency=value)


def test_loader_reports_read_throughput(tmp_path):
    values = np.random.default_rng(2).normal(size=(4096, 32)).astype(np.float32)
    write_store(str(tmp_path), {("res", 0): values})
    store = ActivationStore.open(str(tmp_path))
    loader = ActivationLoader(store, "res", 0, batch_size=256, shuffle_rows=1024, seed=0, stop_row=4096)
    try:
        for _ in range(8):
            loader.next()
        figures = loader.throughput()
    finally:
        loader.close()
    assert figures["read_bytes"] >= 2 * 1024 * 32 * 4 and figures["read_bytes"] % (1024 * 32 * 4) == 0
    assert figures["read_mib_s"] > 0 and figures["wall_mib_s"] > 0


def test_harvest_summary_line_names_the_write_rate():
    summary = HarvestSummary(activations="x", rows=10, arrays=2, bytes=1, seconds=1.0, units_run=1,
                             tokens_per_s=1000.0, write_mib_s=12.5)
    assert "12.5 MiB/s written" in summary.line()
