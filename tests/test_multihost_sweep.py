"""A sweep job too wide for one host, on a loopback Ray cluster of single-device nodes: the
plan gives it 2 hosts, the launcher places one actor on each (STRICT_SPREAD) and they train
as one JAX program with the latent axis across them; losing one of its nodes stops both,
and the job resumes from its checkpoint on the nodes left, unattended. Both end where
one process with the same 1 x 2 mesh ends."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from gemmascope.store.synthetic import write_store
from gemmascope.sweep.ledger import DONE
from tests.harvest_helpers import GEMMASCOPE, ROOT, cli, start_cli
from tests.train_helpers import committed_steps, write_yaml

pytestmark = pytest.mark.ray

JOB = "res-L0-w128"
STEPS = 1500
CHECKPOINT_EVERY = 100


def write_config(run_dir: Path) -> str:
    """One job of one SAE (d_in 256, width 128, batch 128) planned at 1.97 MB on one device,
    1.51 MB per device with the batch split over two, 0.99 MB with the latents split over
    two: on 1 MiB devices the plan gives it 2 hosts with the latent axis across them."""
    from gemmascope.config import Config, SAEGridEntry, SweepConfig, TrainConfig

    config = Config(
        run_dir=str(run_dir),
        saes=(SAEGridEntry(sites=("res",), layers=(0,), widths=(128,), sparsity=(0.03,),
                           tokens=STEPS * 128),),
        train=TrainConfig(batch_size=128, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=50, threshold_lr=1e-2,
                          norm_sample_rows=1024, shuffle_rows=2048, checkpoint_every=CHECKPOINT_EVERY,
                          log_every=CHECKPOINT_EVERY, dead_window_tokens=10**5),
        sweep=SweepConfig(devices_per_job=1, max_hosts_per_job=2, device_memory_gib=2**-10, memory_fraction=1.0,
                          cpus_per_job=1, heartbeat_seconds=1.0, lease_seconds=30.0, harvest=False))
    rows = np.random.default_rng(0).normal(size=(4096, 256)).astype(np.float32)
    write_store(str(run_dir), {("res", 0): rows})
    return write_yaml(config, run_dir / "config.yaml")


def params(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((run_dir / "train" / JOB / "saes").glob("*/params.npz")):
        with np.load(path) as data:
            out[path.parent.name] = {key: data[key] for key in data.files}
    return out


def worst_relative_difference(got: dict, expected: dict) -> float:
    assert sorted(got) == sorted(expected) and len(expected) == 1
    return max(float(np.abs(got[sae][key] - value).max()) / max(float(np.abs(value).max()), 1e-12)
               for sae, arrays in expected.items() for key, value in arrays.items())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The job trained by `gemmascope train` in one process with 2 CPU devices (the same mesh)."""
    import subprocess

    run_dir = tmp_path_factory.mktemp("one_process")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([GEMMASCOPE, "train", write_config(run_dir), "--job", JOB, "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return params(run_dir)


@pytest.fixture
def cluster():
    """A head that runs no jobs and two single-CPU nodes: the job's two hosts."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


def test_the_plan_gives_the_job_two_hosts(tmp_path):
    result = cli("plan", write_config(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    (job,) = json.loads(result.stdout)["jobs"]
    assert job["id"] == JOB
    assert {k: job["resources"][k] for k in ("hosts", "devices", "mesh_data", "mesh_latent")} == \
        {"hosts": 2, "devices": 1, "mesh_data": 1, "mesh_latent": 2}


@pytest.mark.slow  # ~75 s: three Ray nodes, a one-process reference and a two-host run
def test_a_two_host_job_survives_losing_a_host_and_equals_one_process(cluster, one_process, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_cli("sweep", write_config(run_dir), "--ray-address", cluster.address, "--no-progress")
    deadline = time.monotonic() + 300
    while not committed_steps(run_dir, JOB):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the job never checkpointed"
        time.sleep(0.05)
    cluster.remove_node(cluster.list_all_nodes()[1])  # one of the job's two hosts goes
    lost_after = max(committed_steps(run_dir, JOB))
    cluster.add_node(num_cpus=1)  # a spare, so the job finds two hosts again
    stdout, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, stderr[-3000:]

    record = json.loads((run_dir / "sweep" / "jobs" / f"{JOB}.json").read_text())
    assert record["state"] == DONE, record
    assert "2 hosts x 1 cpu (mesh 1 x 2)" in stderr
    assert (record["runs"], record["preemptions"], record["attempts"]) == (2, 1, 0)
    assert "a node of the run was lost" in stderr
    result = record["result"]
    assert result["steps"] == STEPS
    assert result["steps_run"] <= STEPS - lost_after and result["steps_run"] % CHECKPOINT_EVERY == 0
    print(f"host lost after step {lost_after}; resumed run trained {result['steps_run']} steps; max relative "
          f"difference to one process {worst_relative_difference(params(run_dir), one_process):.2e}")
    assert worst_relative_difference(params(run_dir), one_process) < 1e-5
