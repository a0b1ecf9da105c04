"""`gemmascope sweep` end to end on a real local Ray cluster: kill and resume, racing launchers, expired leases."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from gemmascope.store.synthetic import write_store
from gemmascope.sweep.ledger import DONE, JobLedger, Launcher
from tests.harvest_helpers import cli, start_cli
from tests.train_helpers import write_yaml

pytestmark = pytest.mark.ray

JOBS = ["res-L0-w128", "res-L1-w128", "res-L1-w256"]


def sweep_config(run_dir: Path, steps: int = 240, **sweep) -> str:
    """Three jobs: layer 0 and layer 1 at width 128 (two lambdas), layer 1 at width 256 (longer)."""
    from gemmascope.config import Config, SAEGridEntry, SweepConfig, TrainConfig

    config = Config(
        run_dir=str(run_dir),
        saes=(SAEGridEntry(sites=("res",), layers=(0, 1), widths=(128,), sparsity=(0.01, 0.03), tokens=steps * 256),
              SAEGridEntry(sites=("res",), layers=(1,), widths=(256,), sparsity=(0.01,), tokens=2 * steps * 256)),
        train=TrainConfig(batch_size=256, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=50, threshold_lr=1e-2,
                          norm_sample_rows=1024, shuffle_rows=2048, checkpoint_every=40, log_every=40,
                          dead_window_tokens=10**5),
        sweep=SweepConfig(**{"cpus_per_job": 2, "heartbeat_seconds": 1.0, "lease_seconds": 5.0,
                             "harvest": False, **sweep}))
    rows = np.random.default_rng(0).normal(size=(4096, 48)).astype(np.float32)
    write_store(str(run_dir), {("res", 0): rows, ("res", 1): rows[::-1] * 2.0})
    return write_yaml(config, run_dir / "config.yaml")


def records(run_dir: Path) -> dict[str, dict]:
    return {job: json.loads((run_dir / "sweep" / "jobs" / f"{job}.json").read_text()) for job in JOBS}


def final_params(run_dir: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted((run_dir / "train").glob("*/saes/*/params.npz")):
        with np.load(path) as data:
            out[str(path.relative_to(run_dir))] = b"".join(data[k].tobytes() for k in sorted(data.files))
    return out


@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    result = cli("sweep", sweep_config(run_dir), "--ray-address", ray_address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep: 3/3 jobs done (3 run now" in result.stdout
    return run_dir


def test_a_sweep_trains_every_job_once(reference):
    assert all(r["state"] == DONE and r["runs"] == 1 and r["attempts"] == 0 for r in records(reference).values())
    assert len(final_params(reference)) == 5  # 2 + 2 + 1 SAEs
    plan = json.loads((reference / "sweep" / "plan.json").read_text())
    assert [job["id"] for job in plan["jobs"]] == JOBS


def test_rerunning_a_finished_sweep_does_nothing(reference, ray_address):
    before = {path: path.stat().st_mtime_ns for path in (reference / "train").rglob("params.npz")}
    result = cli("sweep", str(reference / "config.yaml"), "--ray-address", ray_address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3/3 jobs done (0 run now" in result.stdout
    assert before == {path: path.stat().st_mtime_ns for path in (reference / "train").rglob("params.npz")}


def test_status_shows_states_metrics_and_checkpoints(reference):
    result = cli("status", str(reference / "config.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["counts"] == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    job = {j["id"]: j for j in status["jobs"]}["res-L1-w256"]
    assert job["step"] == job["steps"] == 480 and job["checkpoint_step"] == 480
    assert [m["sae"] for m in job["metrics"]] == ["w256-s0.01"] and job["metrics"][0]["l0"] > 0
    table = cli("status", str(reference / "config.yaml")).stdout
    assert "3 done" in table and "res-L0-w128" in table


def test_killed_launcher_resumes_and_matches_an_uninterrupted_sweep(reference, ray_address, tmp_path):
    # One job at a time, longest first: res-L1-w256 (480 steps), then res-L0-w128 (240 steps).
    finished, interrupted_job = "res-L1-w256", "res-L0-w128"
    config = sweep_config(tmp_path)
    launcher = start_cli("sweep", config, "--ray-address", ray_address, "--no-progress")
    deadline = time.monotonic() + 300
    checkpoints = tmp_path / "train" / interrupted_job / "checkpoints"
    while time.monotonic() < deadline:  # kill it once the second job has checkpointed mid-run
        steps = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()] if checkpoints.exists() else []
        if steps and max(steps) >= 120:
            break
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        time.sleep(0.05)
    else:
        raise AssertionError("the second job never checkpointed")
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    interrupted = records(tmp_path)
    assert interrupted[finished]["state"] == DONE and interrupted[interrupted_job]["state"] == "running"

    result = cli("sweep", config, "--ray-address", ray_address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    final = records(tmp_path)
    assert final[finished]["runs"] == 1  # finished jobs are not rerun
    assert final[interrupted_job]["runs"] == 2 and final[interrupted_job]["state"] == DONE
    resumed = final[interrupted_job]["result"]
    # From its checkpoint (a multiple of 40, at least 120), not from scratch.
    assert resumed["steps"] == 240 and resumed["steps_run"] <= 120 and resumed["steps_run"] % 40 == 0
    assert final_params(tmp_path) == final_params(reference)


def test_two_launchers_started_together_run_every_job_once(reference, ray_address, tmp_path):
    config = sweep_config(tmp_path, cpus_per_job=1)
    launchers = [start_cli("sweep", config, "--ray-address", ray_address, "--no-progress") for _ in range(2)]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stderr[-3000:]
    assert all(r["state"] == DONE and r["runs"] == 1 for r in records(tmp_path).values())
    run_now = sorted(int(out.split("(")[1].split(" run now")[0]) for out, _ in outputs)
    assert sum(run_now) == 3
    assert final_params(tmp_path) == final_params(reference)


def test_a_lease_left_by_a_dead_launcher_is_taken_over_after_it_expires(ray_address, tmp_path):
    from gemmascope.config import load_config

    config_path = sweep_config(tmp_path, steps=40)
    config = load_config(config_path)
    # A launcher on another host claimed a job, then vanished (its process cannot be checked).
    ghost = JobLedger(config.run_dir, Launcher("other-host", 4242, "ghost000"), config.sweep)
    ghost.register(JOBS)
    held = ghost.claim(JOBS[0])
    result = cli("sweep", config_path, "--ray-address", ray_address, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    final = records(tmp_path)
    taken = final[JOBS[0]]
    assert taken["state"] == DONE and taken["runs"] == 2 and taken["attempts"] == 1
    # It was trained only after the ghost's lease ran out.
    assert taken["result"]["steps"] == 40
    metrics = (tmp_path / "train" / JOBS[0] / "metrics.jsonl").stat().st_mtime
    assert metrics >= held["lease_expires"]


def test_a_missing_store_stops_the_sweep_naming_it(ray_address, tmp_path):
    config = sweep_config(tmp_path)
    shutil.rmtree(tmp_path / "activations")
    result = cli("sweep", config, "--ray-address", ray_address, "--no-progress")
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "no activation store" in message and "gemmascope harvest" in message
