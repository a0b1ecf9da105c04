"""A full disk while writing, simulated by a file-size limit (RLIMIT_FSIZE) on the command.

CPython ignores SIGXFSZ, so a write past the limit fails with EFBIG, as one on a full
disk fails with ENOSPC. Without root there is no small tmpfs to fill, and the limit hits
the same code paths: the command must stop with one line naming the file it could not
write (no traceback, exit status 2), keep everything it committed before (checkpoints
with their manifests, exported files, ledger entries), and the same command rerun
without the limit must finish with the result of an uninterrupted run.

Ray workers are started by the raylet and do not inherit the limit, so the harvest test
limits the driver, which writes the ledger; training and export write in-process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gemmascope.cli import MachineFailureEchoes
from gemmascope.train.checkpoints import Checkpoints
from tests.harvest_helpers import GEMMASCOPE, ROOT, snapshot
from tests.train_helpers import gaussian_store, load_params, small_config, write_yaml

JOB = "res-L0-w64"
SAE = "w64-s0.01"
# 200 steps logging every step: metrics.jsonl (rewritten whole at each log) grows to ~68 KB,
# while no checkpoint file passes ~16 KB.
TRAIN = dict(widths=(64,), sparsity=(0.01,), steps=200, batch=256, checkpoint_every=20, log_every=1,
             shuffle_rows=2048, norm_sample_rows=1024)


# Sets the limit and becomes the command. (A preexec_fn would fork this process, which has
# JAX's threads running, instead of spawning.)
CAPPED = ("import os, resource, sys; limit = int(sys.argv[1]); "
          "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); os.execv(sys.argv[2], sys.argv[2:])")


def gemmascope(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    """Run the command, with every file it writes capped at `limit` bytes."""
    command = [GEMMASCOPE, *args, "--no-progress"]
    if limit is not None:
        command = [sys.executable, "-c", CAPPED, str(limit), *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a stopped command; log lines may come before it, tracebacks may not."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-5000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("gemmascope: error:")]
    assert "File too large" in line, line
    return line


def train_run(run_dir: Path, **changes) -> str:
    gaussian_store(run_dir, n_rows=8192, d_in=16)
    return write_yaml(small_config(run_dir, **{**TRAIN, **changes}), run_dir / "config.yaml")


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "train" / JOB / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run directory of the job trained without a limit: what every stopped run must equal."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = gemmascope("train", train_run(run_dir), "--job", JOB)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def assert_same_sae(run_dir: Path, reference: Path) -> None:
    got, expected = load_params(run_dir, SAE, JOB), load_params(reference, SAE, JOB)
    for key, value in expected.items():
        assert np.array_equal(got[key].view(np.uint32), value.view(np.uint32)), key


def test_metrics_log_past_the_limit_keeps_checkpoints_and_resumes(uninterrupted, tmp_path):
    config = train_run(tmp_path)
    stopped = gemmascope("train", config, "--job", JOB, limit=32 * 1024)
    line = the_error_line(stopped)
    assert f"{tmp_path}/train/{JOB}/metrics.jsonl" in line
    checkpoints = Checkpoints(str(tmp_path / "train" / JOB / "checkpoints"))
    committed = checkpoints.manager.all_steps()
    assert committed and max(committed) < TRAIN["steps"]
    for step in committed:
        checkpoints.verify(step)  # every file as its manifest recorded it
    checkpoints.close()
    steps = logged_steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= max(committed)
    assert not (tmp_path / "train" / JOB / "saes").exists()

    rerun = gemmascope("train", config, "--job", JOB)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_sae(tmp_path, uninterrupted)
    assert logged_steps(tmp_path) == list(range(1, TRAIN["steps"] + 1))


def test_a_checkpoint_past_the_limit_is_one_line_and_resumes(uninterrupted, tmp_path):
    """Orbax writes from threads through TensorStore: its failure must still be one line."""
    config = train_run(tmp_path, log_every=50)  # the log stays small: a checkpoint file meets the limit
    stopped = gemmascope("train", config, "--job", JOB, limit=6_000)
    line = the_error_line(stopped)
    assert f"{tmp_path}/train/{JOB}/checkpoints/20" in line
    checkpoints = Checkpoints(str(tmp_path / "train" / JOB / "checkpoints"))
    assert checkpoints.manager.all_steps() == []  # the half-written step is not a checkpoint
    checkpoints.close()
    rerun = gemmascope("train", config, "--job", JOB)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_sae(tmp_path, uninterrupted)


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_export_past_the_limit_leaves_the_previous_export_as_it_was(uninterrupted):
    run_dir, config = uninterrupted, str(uninterrupted / "config.yaml")
    metrics = run_dir / "train" / JOB / "saes" / SAE / "metrics.json"
    metrics.write_text(json.dumps({"l0": 42.0, "fvu": 0.1, "name": SAE}))  # as if measured by eval
    assert gemmascope("export", config).returncode == 0
    exported = {name: tree(run_dir / name) for name in ("saes", "saelens")}
    params = next((run_dir / "saes").rglob("params.npz"))

    stopped = gemmascope("export", config, limit=params.stat().st_size - 1)
    line = the_error_line(stopped)
    assert str(run_dir / "saes") in line or str(run_dir / "saelens") in line
    assert {name: tree(run_dir / name) for name in exported} == exported  # no file lost, changed or half-written

    assert gemmascope("export", config).returncode == 0
    assert {name: tree(run_dir / name) for name in exported} == exported


def ledger_size(ledger: dict, units: list[str]) -> int:
    """Bytes of the ledger as the driver writes it when just `units` are committed."""
    partial = {**ledger, "complete": False, "units": {u: ledger["units"][u] for u in units}}
    partial.pop("summary", None)
    return len(json.dumps(partial, indent=1, sort_keys=True)) + 1


@pytest.mark.slow  # three harvests; the default suite fills the disk under the other writers
@pytest.mark.ray
def test_harvest_ledger_past_the_limit_keeps_committed_units(ray_address, tmp_path):
    tiny = str(ROOT / "configs" / "tiny-gemma2.yaml")
    reference = tmp_path / "reference"
    assert gemmascope("harvest", tiny, f"run_dir={reference}", "--ray-address", ray_address).returncode == 0
    expected = json.loads((reference / "activations" / "ledger.json").read_text())
    units = sorted(expected["units"])
    assert len(units) >= 3
    # Room for the ledger with one unit committed, not with two: the second commit fails.
    one, two = ledger_size(expected, units[:1]), ledger_size(expected, units[:2])
    run_dir = tmp_path / "run"
    args = ("harvest", tiny, f"run_dir={run_dir}", "--ray-address", ray_address)
    stopped = gemmascope(*args, limit=(one + two) // 2)
    line = the_error_line(stopped)
    assert str(run_dir / "activations" / "ledger.json") in line
    ledger = json.loads((run_dir / "activations" / "ledger.json").read_text())  # the last committed version
    assert not ledger["complete"] and len(ledger["units"]) == 1
    for unit, entry in ledger["units"].items():
        assert entry["crc32c"] == expected["units"][unit]["crc32c"]

    rerun = gemmascope(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(str(run_dir)) == snapshot(str(reference))


def test_a_closed_event_loop_is_an_echo_even_before_the_failure_is_logged(caplog):
    """TensorStore's pending writes may call back into the closed event loop before the
    writer thread's failure reaches the log: one line then too; anything else ignored
    before a failure keeps Python's own report."""
    echoes, reported = MachineFailureEchoes(), []
    echoes.previous_hook = reported.append
    closed = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = SimpleNamespace(exc_value=ValueError("unrelated"))
    with caplog.at_level(logging.WARNING, logger="gemmascope"):
        echoes.unraisable(closed)
        echoes.unraisable(other)
    assert reported == [other]
    assert caplog.messages == ["after the failed write: RuntimeError: Event loop is closed"]
    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "exception in callback", (),
                               (RuntimeError, closed.exc_value, None))
    assert echoes.filter(record) and record.exc_info is None
    assert record.getMessage() == "after the failed write: RuntimeError: Event loop is closed"
