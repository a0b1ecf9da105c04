"""Harvest and training through a proxy that fails GCS requests (tests/fault_proxy.py).

At a 5% fault rate every kind of fault is injected and the results are exactly those of
a run without faults; at 100% a command stops within a bounded time with one line on
stderr, and what it had committed stays intact, so a rerun finishes to the same store.
By default a harvest runs at 5%, meets an outage, and is rerun at 5%; a training job
meets an outage from its start, then runs at 5%. Under `slow`: a whole harvest at 5%,
and a training job whose outage begins after its first checkpoint.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gemmascope import storage
from gemmascope.config import load_config
from gemmascope.harvest.driver import run_harvest
from gemmascope.store import ActivationStore, paths
from tests.fault_proxy import FAILURES, KINDS, FaultProxy
from tests.harvest_helpers import ROOT, snapshot
from tests.train_helpers import gaussian_store, small_config, write_yaml

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
    proxy = FaultProxy(gcs_emulator).start()
    yield proxy
    print(f"fault proxy: {proxy.counts()}")
    proxy.stop()


def test_the_proxy_injects_each_kind_of_fault(gcs_bucket, proxy):
    """Each kind as documented, against the real emulator, and counted."""
    storage.write_bytes_atomic(f"{gcs_bucket}/object", b"x" * 1000)
    url = f"{proxy.url}/storage/v1/b/{gcs_bucket[len('gs://'):]}/o/object?alt=media"
    outcomes = {}
    proxy.set(1.0)
    for kind in KINDS:
        began = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                outcomes[kind] = (len(response.read()), time.monotonic() - began >= proxy.slow_s)
        except urllib.error.HTTPError as err:
            outcomes[kind] = json.loads(err.read())["error"]["code"]
        except (http.client.RemoteDisconnected, http.client.IncompleteRead) as err:
            outcomes[kind] = type(err).__name__
    assert outcomes == {"429": 429, "500": 500, "503": 503, "drop": "RemoteDisconnected",
                        "truncate": "IncompleteRead", "slow": (1000, True)}
    proxy.set(0.0)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"x" * 1000
    assert proxy.counts() == {"requests": 7, "faults": 6, **dict.fromkeys(KINDS, 1)}


@pytest.mark.parametrize("zonal", ["false", "true"])
def test_every_gs_client_gets_the_bounded_retries(zonal):
    """Whichever class gcsfs exports (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT picks its zonal
    extension, the default on real GCS), the storage layer's subclass of it takes over
    gs:// in fsspec's registry, with the storage schedule on every request."""
    check = ("import fsspec, gcsfs; from gemmascope import storage; cls = storage.gcs_filesystem_class(); "
             "assert issubclass(cls, gcsfs.GCSFileSystem); "
             "assert fsspec.get_filesystem_class('gs') is fsspec.get_filesystem_class('gcs') is cls; "
             "assert cls._request.__qualname__.startswith('_bounded'); print(gcsfs.GCSFileSystem.__name__)")
    env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": zonal}
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ("ExtendedGcsFileSystem" if zonal == "true" else "GCSFileSystem")


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


def harvest_args(run_dir: str, ray_address: str) -> list[str]:
    return ["harvest", TINY, f"run_dir={run_dir}", *HARVEST, "--ray-address", ray_address, "--no-progress"]


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
    run_dir = tmp_path_factory.mktemp("local-harvest")
    run_harvest(load_config(TINY, [f"run_dir={run_dir}", *HARVEST]), progress=False)
    return snapshot(str(run_dir))


def since(proxy: FaultProxy, before: dict) -> dict:
    """The proxy's counts since the snapshot `before`."""
    return {key: value - before[key] for key, value in proxy.counts().items()}


def added(*counts: dict) -> dict:
    return {key: sum(c[key] for c in counts) for key in counts[0]}


@pytest.mark.slow
@pytest.mark.ray
def test_harvest_at_5_percent_faults_equals_a_local_harvest(local_harvest, ray_address, gcs_bucket, proxy):
    run_dir = f"{gcs_bucket}/runs/faulty"
    proxy.set(0.05)
    began = time.monotonic()
    result = gemmascope(proxy, *harvest_args(run_dir, ray_address))
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"harvest at 5%: {time.monotonic() - began:.1f} s, {proxy.counts()}")
    assert_every_kind_injected(proxy.counts())
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
            raise AssertionError(f"harvest ended before the outage began:\n{process.stderr.read()[-3000:]}")
        if len(units := committed_units(run_dir)) >= at_least:
            return units
        time.sleep(0.1)
    raise AssertionError(f"no {at_least} committed units within 300 s")


def assert_committed_rows_match(run_dir: str, units: set[int], reference: dict) -> None:
    """The store still lists `units`, and their rows are the reference's, bit for bit."""
    store = ActivationStore.open(run_dir)
    assert units <= set(store.ledger.committed_units) and not store.complete
    for key in store.keys:
        row_bytes = len(reference["arrays"][key]) // store.layout.n_rows
        for start, stop in store.committed_ranges:
            rows = np.ascontiguousarray(store.read(*key, start, stop)).view(np.uint8).tobytes()
            assert rows == reference["arrays"][key][start * row_bytes:stop * row_bytes], (key, start)


@pytest.mark.ray
def test_harvest_through_faults_and_an_outage_equals_a_local_harvest(local_harvest, ray_address, gcs_bucket,
                                                                     proxy):
    """5% faults until two units are committed, then every request fails: the harvest stops
    within the bound with one line and its ledger intact; rerun at 5%, it finishes to the
    same store as a local harvest without faults."""
    run_dir = f"{gcs_bucket}/runs/outage"
    args = harvest_args(run_dir, ray_address)
    proxy.set(0.05)
    began = time.monotonic()
    process = start_gemmascope(proxy, *args)
    committed = wait_for_units(run_dir, process, at_least=2)
    before_outage = proxy.counts()
    proxy.set(1.0, FAILURES)
    outage_began = time.monotonic()
    _, stderr = process.communicate(timeout=STOP_WITHIN_S + 60)
    stopped_s = time.monotonic() - outage_began
    line = assert_stopped_with_one_line(process, stderr)
    outage = since(proxy, before_outage)
    print(f"harvest at 5%: {len(committed)} units committed in {outage_began - began:.1f} s, {before_outage}")
    print(f"harvest at 100%: stopped {stopped_s:.1f} s after the outage began, {outage}: {line}")
    assert stopped_s < STOP_WITHIN_S
    assert_every_kind_injected(outage, FAILURES)
    assert_committed_rows_match(run_dir, committed, local_harvest)

    before_rerun = proxy.counts()
    proxy.set(0.05)
    began = time.monotonic()
    rerun = gemmascope(proxy, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    print(f"harvest rerun at 5%: {time.monotonic() - began:.1f} s, {since(proxy, before_rerun)}")
    assert_every_kind_injected(added(before_outage, since(proxy, before_rerun)))
    assert snapshot(run_dir) == local_harvest


# ------------------------------------------------------------------------- training


def gs_params(run_dir: str) -> dict[str, np.ndarray]:
    url = storage.join(run_dir, "train", JOB, "saes", "w128-s0.03", "params.npz")
    with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def train_config(run_dir: str, tmp_path: Path, **overrides) -> str:
    """A one-job config over a gaussian store written to `run_dir` (past the proxy)."""
    gaussian_store(run_dir, n_rows=4096, d_in=16)
    return write_yaml(small_config(run_dir, **{**TRAIN, **overrides}), tmp_path / "config.yaml")


def train_locally(tmp_path: Path, **overrides) -> dict[str, np.ndarray]:
    """The job trained on local disk without the proxy: what runs through it must equal."""
    result = gemmascope(None, "train", train_config(str(tmp_path), tmp_path, **overrides), "--job", JOB,
                        "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "train" / JOB / "saes" / "w128-s0.03" / "params.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def trained_without_faults(tmp_path_factory) -> dict[str, np.ndarray]:
    return train_locally(tmp_path_factory.mktemp("trained-local"))


def assert_same_params(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key].view(np.uint32), expected[key].view(np.uint32)), key


def test_training_stops_in_an_outage_then_at_5_percent_gives_the_same_parameters(
        trained_without_faults, gcs_bucket, proxy, tmp_path):
    run_dir = f"{gcs_bucket}/runs/train"
    config = train_config(run_dir, tmp_path)
    store = snapshot(run_dir)
    proxy.set(1.0, FAILURES)
    began = time.monotonic()
    result = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress", timeout=STOP_WITHIN_S + 60)
    stopped_s = time.monotonic() - began
    line = assert_stopped_with_one_line(result, result.stderr)
    print(f"training at 100%: stopped after {stopped_s:.1f} s, {proxy.counts()}: {line}")
    assert stopped_s < STOP_WITHIN_S
    assert snapshot(run_dir) == store

    before = proxy.counts()
    proxy.set(0.05)
    began = time.monotonic()
    result = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = since(proxy, before)
    print(f"training at 5%: {time.monotonic() - began:.1f} s, {counts}")
    assert_every_kind_injected(counts)
    assert_same_params(gs_params(run_dir), trained_without_faults)


# Long enough (300 steps, a checkpoint every 50) for an outage to begin mid-run.
LONG_TRAIN = dict(steps=300, checkpoint_every=50, log_every=25)


def wait_for_checkpoint(run_dir: str, process: subprocess.Popen) -> str:
    """The first committed checkpoint (its manifest written) of a gs:// job; its step."""
    pattern = storage.join(run_dir, "train", JOB, "checkpoints", "*", "checksums.json")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training ended before the outage began:\n{process.stderr.read()[-3000:]}")
        if manifests := storage.glob(pattern):
            return manifests[0].rsplit("/", 2)[-2]
        time.sleep(0.1)
    raise AssertionError("no checkpoint within 300 s")


@pytest.mark.slow
def test_training_outage_after_a_checkpoint_resumes_to_the_same_parameters(gcs_bucket, proxy, tmp_path):
    (tmp_path / "local").mkdir()
    expected = train_locally(tmp_path / "local", **LONG_TRAIN)
    run_dir = f"{gcs_bucket}/runs/train-outage"
    config = train_config(run_dir, tmp_path, **LONG_TRAIN)
    process = start_gemmascope(proxy, "train", config, "--job", JOB, "--no-progress")
    step = wait_for_checkpoint(run_dir, process)
    proxy.set(1.0, FAILURES)
    began = time.monotonic()
    _, stderr = process.communicate(timeout=STOP_WITHIN_S + 60)
    stopped_s = time.monotonic() - began
    line = assert_stopped_with_one_line(process, stderr)
    print(f"training at 100% after step {step}: stopped {stopped_s:.1f} s later, {proxy.counts()}: {line}")
    assert stopped_s < STOP_WITHIN_S

    proxy.set(0.0)
    rerun = gemmascope(proxy, "train", config, "--job", JOB, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "now," in rerun.stdout and f"({LONG_TRAIN['steps']} now" not in rerun.stdout, rerun.stdout
    assert_same_params(gs_params(run_dir), expected)
