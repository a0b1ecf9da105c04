"""`gemmascope status CONFIG`: each job's state, attempts, progress, last metrics and checkpoint.

Read-only: it reads the plan the last launcher published (or plans afresh), the job
ledger, each job's metrics.jsonl and its checkpoint directory, and never takes a lease.
"""

from __future__ import annotations

import time

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.sweep.ledger import PENDING, JobLedger, Launcher
from gemmascope.sweep.plan import model_shape, plan
from gemmascope.train.trainer import job_dir, logged_metrics


def _plan(config: Config) -> dict:
    url = storage.join(storage.normalize(config.run_dir), "sweep", "plan.json")
    if storage.exists(url):
        return storage.read_json(url)
    return plan(config, model_shape(config))


def _last_metrics(config: Config, job_id: str) -> list[dict]:
    """The last logged record of each SAE of the job."""
    return list({record["sae"]: record for record in logged_metrics(config, job_id)}.values())


def _checkpoint_step(config: Config, job_id: str) -> int | None:
    """The newest complete checkpoint (Orbax names finished step directories by the step alone)."""
    url = storage.join(job_dir(config, job_id), "checkpoints")
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    steps = [int(name) for name in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
             if name.isdigit()]
    return max(steps, default=None)


def status(config: Config) -> dict:
    planned = _plan(config)
    ledger = JobLedger(config.run_dir, Launcher.this_process(), config.sweep)
    now = time.time()
    jobs = []
    for job in planned["jobs"]:
        record = ledger.read(job["id"]) or {"state": PENDING, "attempts": 0, "runs": 0, "owner": None,
                                            "lease_expires": None, "error": None}
        metrics = _last_metrics(config, job["id"])
        jobs.append({
            "id": job["id"], "state": record["state"], "attempts": record["attempts"], "runs": record.get("runs", 0),
            "owner": record["owner"],
            "lease_left_s": None if record["lease_expires"] is None else round(record["lease_expires"] - now, 1),
            "error": record["error"], "steps": job["steps"],
            "step": max((m["step"] for m in metrics), default=0),
            "checkpoint_step": _checkpoint_step(config, job["id"]),
            "metrics": [{k: m[k] for k in ("sae", "l0", "fvu", "mse", "dead_fraction", "tokens")} for m in metrics],
        })
    counts = {state: sum(j["state"] == state for j in jobs) for state in ("pending", "running", "done", "failed")}
    return {"config": config.origin, "run_dir": storage.normalize(config.run_dir), "counts": counts, "jobs": jobs}


def format_status(result: dict) -> str:
    counts = result["counts"]
    lines = [f"{result['run_dir']}: " + ", ".join(f"{n} {state}" for state, n in counts.items()), ""]
    header = f"{'job':<28} {'state':<8} {'att':>3} {'step':>15} {'ckpt':>9}  last metrics (L0 / FVU per SAE)"
    lines += [header, "-" * len(header)]
    for job in result["jobs"]:
        metrics = "  ".join(f"{m['sae']}: {m['l0']:.1f}/{m['fvu']:.3f}" for m in job["metrics"])
        checkpoint = "-" if job["checkpoint_step"] is None else f"{job['checkpoint_step']:,}"
        lines.append(f"{job['id']:<28} {job['state']:<8} {job['attempts']:>3} "
                     f"{job['step']:>7,}/{job['steps']:<7,} {checkpoint:>9}  {metrics}")
        if job["state"] == "running":
            lines.append(f"{'':<28} held by {job['owner']}, lease {job['lease_left_s']:.0f} s left")
        if job["error"]:
            lines.append(f"{'':<28} error: {job['error']}")
    return "\n".join(lines)
