"""Harvest and training through a proxy that fails GCS requests (tests/fault_proxy.py).

At a 5% fault rate every kind of fault is injected and the results are exactly those of
a run without faults; at 100% a command stops within a bounded time with one line on
stderr, and what it had committed stays intact, so a rerun finishes to the same store.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemmascope import storage
from gemmascope.harvest.driver import run_harvest
from gemmascope.store import ActivationStore, paths
from tests.fault_proxy import FAILURES, KINDS, FaultProxy
from tests.harvest_helpers import ROOT, snapshot
from tests.train_helpers import gaussian_store, small_config, write_yaml

pytestmark = pytest.mark.ray

GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")
TINY = str(ROOT / "configs" / "tiny-gemma2.yaml")
# 6 units of 512 rows, 8 arrays: a few hundred requests, so 5% injects every kind.
HARVEST = ["harvest.max_tokens=3000", "harvest.layers=[1,3]", "harvest.unit_rows=512"]
JOB = "res-L0-w128"
TRAIN = dict(steps=40, batch=256, checkpoint_every=20, log_every=10, shuffle_rows=2048, norm_sample_rows=1024)
STOP_WITHIN_S = 120


@pytest.fixture
def proxy(gcs_emulator):
    """The fault proxy in front of the session's emulator, forwarding everything until told."""
    proxy = FaultProxy(gcs_emulator, seed=0).start()
    yield proxy
    print(f"fault proxy: {proxy.counts()}")
    proxy.stop()


def gemmascope(proxy: FaultProxy | None, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI with its GCS traffic (and its Ray workers') through `proxy`."""
    return subprocess.run([GEMMASCOPE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=through(proxy))


def start_gemmascope(proxy: FaultProxy, *args: str) -> subprocess.Popen:
    return subprocess.Popen([GEMMASCOPE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=through(proxy))


def through(proxy: FaultProxy | None) -> dict[str, str]:
    env = os.environ.copy()
    if proxy is not None:
        env.update(STORAGE_EMULATOR_HOST=proxy.url, TENSORSTORE_GCS_HTTP_URL=proxy.url)
    return env


def harvest_args(run_dir: str, ray_address: str, *extra: str) -> list[str]:
    return ["harvest", TINY, f"run_dir={run_dir}", *HARVEST, *extra, "--ray-address", ray_address, "--no-progress"]


def assert_every_kind_injected(counts: dict, kinds=KINDS) -> None:
    assert all(counts[kind] > 0 for kind in kinds), counts


def assert_stopped_with_one_line(result: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> str:
    """Exit status 2, no traceback, one error line that names a gs:// object; that line."""
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("gemmascope: error: ")]
    assert len(errors) == 1, stderr[-3000:]  # Ray's workers may log after it
    assert "gs://" in errors[0], errors[0]
    # Said by the storage layer, or by TensorStore when an array could not even be opened.
    assert "storage unavailable" in errors[0] or "retry attempts failed" in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def local_harvest(ray_address, tmp_path_factory):
    """The HARVEST store on local disk, without faults: what every gs:// run must equal."""
    from gemmascope.config import load_config

    run_dir = tmp_path_factory.mktemp("local-harvest")
    run_harvest(load_config(TINY, [f"run_dir={run_dir}", *HARVEST]), progress=False)
    return snapshot(str(run_dir))


def test_harvest_at_5_percent_faults_equals_a_local_harvest(local_harvest, ray_address, gcs_bucket, proxy):
    run_dir = f"{gcs_bucket}/runs/faulty"
    proxy.set(0.05)
    began = time.monotonic()
    result = gemmascope(proxy, *harvest_args(run_dir, ray_address))
    assert result.returncode == 0, result.stderr[-3000:]
    counts = proxy.counts()
    print(f"harvest at 5%: {time.monotonic() - began:.1f} s, {counts}")
    assert_every_kind_injected(counts)
    assert snapshot(run_dir) == local_harvest


def committed_units(run_dir: str) -> set[int]:
    """Units in a gs:// store's ledger, read past the proxy (none before the ledger exists)."""
    try:
        return {int(u) for u in storage.read_json(paths.ledger_url(paths.activations_url(run_dir)))["units"]}
    except FileNotFoundError:
        return set()


def wait_for_units(run_dir: str, process: subprocess.Popen, at_least: int) -> set[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"harvest ended before the faults began:\n{process.stderr.read()[-3000:]}")
        if len(units := committed_units(run_dir)) >= at_least:
            return units
        time.sleep(0.1)
    raise AssertionError(f"no {at_least} committed units within 300 s")


def test_harvest_at_100_percent_stops_keeps_its_commits_and_resumes(local_harvest, ray_address, gcs_bucket,
                                                                   proxy):
    run_dir = f"{gcs_bucket}/runs/outage"
    args = harvest_args(run_dir, ray_address)
    process = start_gemmascope(proxy, *args)
    before = wait_for_units(run_dir, process, at_least=2)
    proxy.set(1.0, FAILURES)
    began = time.monotonic()
    _, stderr = process.communicate(timeout=STOP_WITHIN_S + 60)
    stopped_s = time.monotonic() - began
    last = assert_stopped_with_one_line(process, stderr)
    print(f"harvest at 100%: stopped {stopped_s:.1f} s after the outage began, {proxy.counts()}: {last}")
    assert stopped_s < STOP_WITHIN_S
    assert_every_kind_injected(proxy.counts(), FAILURES)

    # The units committed before the outage are still listed, and their rows are the reference's.
    store = ActivationStore.open(run_dir)
    assert before <= set(store.ledger.committed_units) and not store.complete
    for key in store.keys:
        for start, stop in store.committed_ranges:
            rows = np.ascontiguousarray(store.read(*key, start, stop)).view(np.uint8).tobytes()
            row_bytes = len(local_harvest["arrays"][key]) // store.layout.n_rows
            assert rows == local_harvest["arrays"][key][start * row_bytes:stop * row_bytes], (key, start)

    proxy.set(0.0)
    rerun = gemmascope(proxy, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(run_dir) == local_harvest


# ------------------------------------------------------------------------- training


def gs_params(run_dir: str) -> dict[str, np.ndarray]:
    url = storage.join(run_dir, "train", JOB, "saes", "w128-s0.03", "params.npz")
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def train_config(run_dir: str, tmp_path: Path) -> str:
    """A one-job config over a gaussian store written to `run_dir` (past the proxy)."""
    gaussian_store(run_dir, n_rows=4096, d_in=16)
    return write_yaml(small_config(run_dir, **TRAIN), tmp_path / "config.yaml")


@pytest.fixture(scope="module")
def trained_without_faults(tmp_path_factory) -> dict[str, np.ndarray]:
    """The job trained on local disk: what every run through the proxy must equal."""
    tmp_path = tmp_path_factory.mktemp("trained-local")
    result = gemmascope(None, "train", train_config(str(tmp_path), tmp_path), "--job", JOB, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "train" / JOB / "saes" / "w128-s0.03" / "params.npz") as data:
        return {k: data[k] for k in data.files}


def assert_same_params(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key].view(np.uint32), expected[key].view(np.uint32)), key


def test_training_at_5_percent_faults_gives_the_same_parameters(trained_without_faults, gcs_bucket, proxy,
                                                                tmp_path):
    run_dir = f"{gcs_bucket}/runs/train-faulty"
    config = train_config(run_dir, tmp_path)
    proxy.set(0.05)
    began = time.monotonic()
    result = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = proxy.counts()
    print(f"training at 5%: {time.monotonic() - began:.1f} s, {counts}")
    assert_every_kind_injected(counts)
    assert_same_params(gs_params(run_dir), trained_without_faults)


def test_training_at_100_percent_stops_then_reruns_to_the_same_parameters(trained_without_faults, gcs_bucket,
                                                                          proxy, tmp_path):
    run_dir = f"{gcs_bucket}/runs/train-outage"
    config = train_config(run_dir, tmp_path)
    store_before = snapshot(run_dir)
    proxy.set(1.0, FAILURES)
    began = time.monotonic()
    result = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress", timeout=STOP_WITHIN_S + 60)
    stopped_s = time.monotonic() - began
    last = assert_stopped_with_one_line(result, result.stderr)
    print(f"training at 100%: stopped after {stopped_s:.1f} s, {proxy.counts()}: {last}")
    assert stopped_s < STOP_WITHIN_S
    assert snapshot(run_dir) == store_before

    proxy.set(0.0)
    rerun = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_params(gs_params(run_dir), trained_without_faults)
