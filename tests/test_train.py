"""Training end to end: recovery of a known dictionary, crash/resume, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gemmascope.config import SAEGridEntry
from gemmascope.errors import UserError
from gemmascope.store.synthetic import sparse_dictionary_data, write_store
from gemmascope.train.trainer import train_job
from tests.train_helpers import (
    committed_steps,
    gaussian_store,
    load_params,
    small_config,
    write_yaml,
)

ROOT = Path(__file__).resolve().parent.parent
GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")


def test_recovers_a_known_sparse_dictionary(tmp_path):
    """64 unit-norm atoms, 3 active per row: >= 85% of atoms matched by a decoder row with cos > 0.9."""
    rows, atoms = sparse_dictionary_data(65536, 32, 64, 3, seed=0)
    write_store(str(tmp_path), {("res", 0): rows})
    config = small_config(tmp_path, widths=(128,), sparsity=(0.03,), steps=3000, sparsity_warmup_steps=750,
                          log_every=250, sparse_max_density=0.1)
    train_job(config, "res-L0-w128", progress=False)
    W_dec = load_params(tmp_path, "w128-s0.03", "res-L0-w128")["W_dec"]
    cosine = atoms @ (W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)).T
    recovered = (cosine.max(axis=1) > 0.9).mean()
    assert recovered >= 0.85, recovered
    records = [json.loads(line) for line in
               (tmp_path / "train" / "res-L0-w128" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    # Dense while the SAE is still dense, sparse once L0 fell: the last steps ran the sparse path.
    assert not records[0]["sparse_step"] and final["sparse_step"], records
    assert 2.0 <= final["l0"] <= 4.0, final  # true L0 is 3
    assert final["fvu"] < 0.15, final
    # The loader's read rate, as the log reports it: positive, and at most what the 2 cores
    # could copy (a store on local disk read in 4 KiB-row blocks; ~GiB/s at most).
    assert all(0 < record["loader_read_mib_s"] < 100_000 for record in records)


def _run_cli(config_path: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([GEMMASCOPE, "train", config_path, "--job", "res-L0-w512", "--no-progress", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = committed_steps(run_dir, "res-L0-w512")
        if steps and steps[-1] >= at_least:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before it could be interrupted:\n{process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


STEPS = 600
RESUME = dict(widths=(512,), sparsity=(0.01, 0.03, 0.1), steps=STEPS, batch=512, checkpoint_every=50,
              log_every=25, shuffle_rows=4096)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    gaussian_store(run_dir, n_rows=20000, d_in=64)
    path = write_yaml(small_config(run_dir, **RESUME), run_dir / "config.yaml")
    process = _run_cli(path)
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    return {name: load_params(run_dir, name, "res-L0-w512") for name in ("w512-s0.01", "w512-s0.03", "w512-s0.1")}


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path, how):
    gaussian_store(tmp_path, n_rows=20000, d_in=64)
    path = write_yaml(small_config(tmp_path, **RESUME), tmp_path / "config.yaml")
    process = _run_cli(path)
    _wait_for_checkpoint(tmp_path, process, at_least=100)
    process.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    process.wait(timeout=120)
    stopped_at = committed_steps(tmp_path, "res-L0-w512")[-1]
    assert 100 <= stopped_at < STEPS
    if how == "sigterm":
        assert process.returncode == 143
        assert "checkpointed at step" in process.stderr.read()
    rerun = _run_cli(path)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-3000:]
    assert f"({STEPS - stopped_at} now" in rerun.stdout.read()
    for name, expected in uninterrupted.items():
        got = load_params(tmp_path, name, "res-L0-w512")
        for key in expected:
            assert np.array_equal(got[key].view(np.uint32), expected[key].view(np.uint32)), (name, key)
    metrics = [json.loads(line) for line in (tmp_path / "train" / "res-L0-w512" / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if m["sae"] == "w512-s0.01"]
    assert steps == list(range(25, STEPS + 1, 25))  # no step logged twice after the resume


def test_sigterm_during_a_checkpointing_step_saves_once_and_exits_143(tmp_path):
    """Every step checkpoints here, so the signal always lands on a step that already saved."""
    gaussian_store(tmp_path, n_rows=20000, d_in=64)
    path = write_yaml(small_config(tmp_path, **{**RESUME, "checkpoint_every": 1}), tmp_path / "config.yaml")
    process = _run_cli(path)
    _wait_for_checkpoint(tmp_path, process, at_least=5)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    assert process.returncode == 143, process.stderr.read()[-3000:]
    assert "checkpointed at step" in process.stderr.read()


def test_missing_store(tmp_path):
    with pytest.raises(UserError, match="no activation store"):
        train_job(small_config(tmp_path / "nothing"), "res-L0", progress=False)


def test_unknown_job_and_missing_stream(tmp_path):
    gaussian_store(tmp_path)
    with pytest.raises(UserError, match="no job 'res-L9'"):
        train_job(small_config(tmp_path), "res-L9", progress=False)
    config = small_config(tmp_path)
    other = type(config)(run_dir=config.run_dir, saes=(SAEGridEntry(sites=("mlp",), layers=(0,)),),
                         train=config.train)
    with pytest.raises(UserError, match="no activations for site 'mlp' layer 0"):
        train_job(other, "mlp-L0-w16k", progress=False)


def test_store_with_a_different_d_in_is_refused(tmp_path):
    gaussian_store(tmp_path, d_in=32)
    config = small_config(tmp_path, steps=4, log_every=2)
    train_job(config, "res-L0-w128", progress=False)
    shutil.rmtree(tmp_path / "activations")
    gaussian_store(tmp_path, d_in=48)  # the store under the job was replaced by one of another shape
    with pytest.raises(UserError, match="d_in=32.*d_in=48"):
        train_job(config, "res-L0-w128", progress=False)


def _store_with_nan(run_dir: Path) -> None:
    rows = np.random.default_rng(0).normal(size=(8192, 16)).astype(np.float32)
    rows[5000, 3] = np.nan
    rows[6000, 0] = np.inf
    write_store(str(run_dir), {("res", 0): rows})


def test_nonfinite_rows_stop_with_the_row(tmp_path):
    _store_with_nan(tmp_path)
    config = small_config(tmp_path, steps=40, batch=512, shuffle_rows=8192, norm_sample_rows=512)
    with pytest.raises(UserError, match=r"row (5000|6000) has NaN/inf"):
        train_job(config, "res-L0-w128", progress=False)


def test_nonfinite_rows_can_be_skipped_and_counted(tmp_path):
    _store_with_nan(tmp_path)
    config = small_config(tmp_path, steps=40, batch=512, shuffle_rows=8192, norm_sample_rows=512,
                          nonfinite="skip", log_every=40)
    train_job(config, "res-L0-w128", progress=False)
    final = json.loads((tmp_path / "train" / "res-L0-w128" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["nonfinite_rows_skipped"] >= 2
    params = load_params(tmp_path, "w128-s0.03", "res-L0-w128")
    assert all(np.isfinite(v).all() for v in params.values())
