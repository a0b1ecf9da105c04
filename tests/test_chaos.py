"""The crash matrix: every stage SIGKILLed at seeded crash points, rerun, and compared with
the uninterrupted run.

A module fixture runs harvest -> sweep -> eval -> export on a tiny Gemma 2 once, with
`GEMMASCOPE_CRASH_TRACE` set, which records every crash point each process passes
(`gemmascope.faults`). Each case copies the run as it stood before one stage, reruns
that stage with `GEMMASCOPE_CRASH_AT=<prefix>:<n>` (n drawn from a seeded RNG among the
points one process meets), checks that the kill happened, reruns the same command
without it, and compares the stage's outputs with the uninterrupted run's: the store
bit for bit (rows, token table, ledger checksums), the SAE parameters bit for bit,
metrics and exported bytes equal, every job done once with no lease left behind.

`make chaos` runs the whole matrix (`slow`); the default suite runs one seed of a few cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from gemmascope.faults import CRASH_AT, CRASH_MARK, CRASH_TRACE
from tests.harvest_helpers import GEMMASCOPE, ROOT, snapshot

pytestmark = pytest.mark.ray

TINY = str(ROOT / "configs" / "tiny-gemma2.yaml")
OVERRIDES = [
    "harvest.sites=[res, mlp]", "harvest.layers=[1, 2]", "harvest.max_tokens=8000", "harvest.unit_rows=1024",
    "saes=[{sites: [res], layers: [1], widths: [128], sparsity: [1.0e-3, 1.0e-1], tokens: 12800},"
    " {sites: [mlp], layers: [2], widths: [64], sparsity: [1.0e-2], tokens: 12800}]",
    "train.batch_size=256", "train.lr=3.0e-3", "train.threshold_lr=1.0e-2", "train.lr_warmup_steps=5",
    "train.sparsity_warmup_steps=10", "train.norm_sample_rows=1024", "train.shuffle_rows=2048",
    "train.holdout_rows=1000", "train.log_every=10", "train.checkpoint_every=10",
    "eval.sequences=4", "eval.batch_size=2", "sweep.cpus_per_job=1", "sweep.harvest=false",
    "sweep.heartbeat_seconds=1.0", "sweep.lease_seconds=5.0",
]
STAGES = ("harvest", "sweep", "eval", "export")

# (stage, crash-point prefix, which process meets it). Prefixes pick the process: the
# harvest ledger and job records are written by the driver/launcher, shard writes and
# training steps run in Ray workers.
CASES = {
    "harvest driver, ledger commit": ("harvest", "storage.publish ledger.json", "driver"),
    "harvest worker, shard write in flight": ("harvest", "harvest.shard_write", "worker"),
    "harvest worker, token table publish": ("harvest", "storage.publish unit-", "worker"),
    "sweep launcher, lease just claimed": ("sweep", "sweep.claimed", "driver"),
    "sweep launcher, job record write": ("sweep", "storage.publish res-", "driver"),
    "train worker, between steps": ("sweep", "train.step", "worker"),
    "train worker, checkpoint before its manifest": ("sweep", "train.checkpoint_saved", "worker"),
    "train worker, SAE publish": ("sweep", "storage.publish params.npz", "worker"),
    "eval, mid LM pass": ("eval", "eval.batch", "driver"),
    "eval, metrics publish": ("eval", "storage.publish metrics.json", "driver"),
    "export, any file": ("export", "storage.publish", "driver"),
}
DEFAULT = ("harvest driver, ledger commit", "train worker, between steps", "export, any file")
SEEDS = range(3)


def run_stage(stage: str, run_dir: Path, ray_address: str, **env: str) -> subprocess.CompletedProcess:
    args = [GEMMASCOPE, stage, TINY, f"run_dir={run_dir}", *OVERRIDES, "--no-progress"]
    if stage in ("harvest", "sweep"):
        args += ["--ray-address", ray_address]
    environment = {k: v for k, v in os.environ.items() if k not in (CRASH_AT, CRASH_MARK, CRASH_TRACE)}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**environment, **env})


def outputs(stage: str, run_dir: Path) -> object:
    """What a stage produced, as comparable values (free of timings and hostnames)."""
    if stage == "harvest":
        return snapshot(str(run_dir))
    if stage == "sweep":
        records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "sweep" / "jobs").glob("*.json")}
        assert all(r["state"] == "done" and r["owner"] is None and r["lease_expires"] is None
                   for r in records.values()), records
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "train").glob("*/saes/*/*"))}
    if stage == "eval":
        return {str(p.relative_to(run_dir)): json.loads(p.read_text())
                for p in sorted((run_dir / "train").glob("*/saes/*/metrics.json"))}
    # config.json records the config that made the SAE, run_dir included: compare it as RUN.
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes().replace(bytes(run_dir), b"RUN")).hexdigest()
            for p in sorted([*(run_dir / "saes").rglob("*"), *(run_dir / "saelens").rglob("*")])
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def pipeline(ray_address, tmp_path_factory):
    """Each stage's input (a copy of the run before it), output and per-process crash points."""
    root = tmp_path_factory.mktemp("chaos")
    run_dir = root / "run"
    before, after, points = {}, {}, {}
    for stage in STAGES:
        before[stage] = root / f"before-{stage}"
        if run_dir.exists():
            shutil.copytree(run_dir, before[stage])
        trace = root / f"{stage}.trace"
        result = run_stage(stage, run_dir, ray_address, **{CRASH_TRACE: str(trace)})
        assert result.returncode == 0, result.stderr[-3000:]
        after[stage] = outputs(stage, run_dir)
        points[stage] = [line.split(" ", 1) for line in trace.read_text().splitlines()]
    return {"before": before, "after": after, "points": points}


def crash_count(points: list[list[str]], prefix: str, process: str) -> int:
    """How many times one process meets `prefix`: the driver's count, or the fewest any
    worker met (workers share units dynamically, so a rerun may hand one fewer)."""
    counts = Counter(pid for pid, name in points if name.startswith(prefix))
    assert counts, f"no crash point {prefix!r} was passed"
    return max(counts.values()) if process == "driver" else min(counts.values())


def crash_and_resume(pipeline, ray_address, tmp_path, case: str, seed: int) -> None:
    stage, prefix, process = CASES[case]
    run_dir = tmp_path / "run"
    if pipeline["before"][stage].exists():
        shutil.copytree(pipeline["before"][stage], run_dir)
    limit = crash_count(pipeline["points"][stage], prefix, process)
    n = random.Random(f"{case}/{seed}").randint(1, limit)
    mark = tmp_path / "crashed"
    crashed = run_stage(stage, run_dir, ray_address, **{CRASH_AT: f"{prefix}:{n}", CRASH_MARK: str(mark)})
    assert mark.exists(), f"{case}: point {n} of {limit} was never reached\n{crashed.stderr[-2000:]}"
    if process == "driver":
        assert crashed.returncode == -9, crashed.stderr[-3000:]  # SIGKILL, nothing flushed
    rerun = run_stage(stage, run_dir, ray_address)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outputs(stage, run_dir) == pipeline["after"][stage], f"{case} at point {n}: outputs differ"


@pytest.mark.parametrize("case", DEFAULT)
def test_crash_and_resume(pipeline, ray_address, tmp_path, case):
    crash_and_resume(pipeline, ray_address, tmp_path, case, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_crash_matrix(pipeline, ray_address, tmp_path, case, seed):
    if case in DEFAULT and seed == 0:
        pytest.skip("in the default suite")
    crash_and_resume(pipeline, ray_address, tmp_path, case, seed)
