"""Preemption on a multi-node Ray cluster on loopback (Ray's cluster_utils): a job whose node is
taken away resumes from its last checkpoint on another node, without anyone rerunning the
sweep, and ends with the result of an uninterrupted run; a job that fails again and again
while its node lives uses up its attempts instead."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from gemmascope.store.synthetic import write_store
from gemmascope.sweep.ledger import DONE, FAILED
from tests.harvest_helpers import cli, start_cli
from tests.train_helpers import committed_steps, write_yaml

pytestmark = pytest.mark.ray

JOB = "res-L0-w128"
STEPS = 2000
CHECKPOINT_EVERY = 100


def write_config(run_dir: Path, **sweep) -> str:
    from gemmascope.config import Config, SAEGridEntry, SweepConfig, TrainConfig

    config = Config(
        run_dir=str(run_dir),
        saes=(SAEGridEntry(sites=("res",), layers=(0,), widths=(128,), sparsity=(0.01, 0.03),
                           tokens=STEPS * 256),),
        train=TrainConfig(batch_size=256, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=50, threshold_lr=1e-2,
                          norm_sample_rows=1024, shuffle_rows=2048, checkpoint_every=CHECKPOINT_EVERY,
                          log_every=CHECKPOINT_EVERY, dead_window_tokens=10**5),
        sweep=SweepConfig(**{"cpus_per_job": 1, "heartbeat_seconds": 1.0, "lease_seconds": 30.0,
                             "harvest": False, **sweep}))
    rows = np.random.default_rng(0).normal(size=(4096, 48)).astype(np.float32)
    write_store(str(run_dir), {("res", 0): rows})
    return write_yaml(config, run_dir / "config.yaml")


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "sweep" / "jobs" / f"{JOB}.json").read_text())


def params(run_dir: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted((run_dir / "train" / JOB / "saes").glob("*/params.npz")):
        with np.load(path) as data:
            out[path.parent.name] = b"".join(data[k].tobytes() for k in sorted(data.files))
    return out


@pytest.fixture(scope="module")
def cluster():
    """A head that runs no jobs (CPU 0) and one worker node; a test that removes the worker
    adds another, so each test starts with exactly one."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def test_a_job_whose_node_is_lost_resumes_on_another_node_and_matches_an_uninterrupted_run(cluster, tmp_path):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = cli("train", write_config(reference_dir), "--job", JOB, "--no-progress")
    assert reference.returncode == 0, reference.stderr[-3000:]

    (first_node,) = cluster.list_all_nodes()[1:]
    launcher = start_cli("sweep", write_config(run_dir), "--ray-address", cluster.address, "--no-progress")
    deadline = time.monotonic() + 300
    while not committed_steps(run_dir, JOB):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the job never checkpointed"
        time.sleep(0.05)
    cluster.remove_node(first_node)  # the spot VM is taken away, its processes with it
    lost_after = max(committed_steps(run_dir, JOB))
    cluster.add_node(num_cpus=1)  # where the job can go on
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]

    final = record(run_dir)
    assert final["state"] == DONE
    assert (final["runs"], final["preemptions"], final["attempts"]) == (2, 1, 0)
    assert "preempted" in stderr and "a node of the run was lost" in stderr
    result = final["result"]
    # Resumed from a checkpoint at or after the one seen before the node went, not from step 0.
    assert result["steps"] == STEPS and result["steps_run"] <= STEPS - lost_after
    assert result["steps_run"] % CHECKPOINT_EVERY == 0
    assert "sweep: 1/1 jobs done (1 run now" in stdout
    assert params(run_dir) == params(reference_dir) and len(params(run_dir)) == 2


def test_a_job_that_keeps_crashing_on_a_live_node_uses_its_attempts_not_its_preemptions(cluster, tmp_path,
                                                                                       monkeypatch):
    # Every run's training process kills itself at its 30th step: the node stays up.
    monkeypatch.setenv("GEMMASCOPE_CRASH_AT", "train.step:30")
    monkeypatch.delenv("GEMMASCOPE_CRASH_MARK", raising=False)
    run_dir = tmp_path / "run"
    result = cli("sweep", write_config(run_dir, max_attempts=2), "--ray-address", cluster.address,
                 "--no-progress")
    final = record(run_dir)
    assert final["state"] == FAILED
    assert (final["runs"], final["attempts"], final["preemptions"]) == (2, 2, 0)
    assert "ActorDiedError" in final["error"] or "died" in final["error"]
    assert f"failed: {JOB}" in result.stdout or f"{JOB}:" in result.stdout
