"""The stages chained as idempotent steps: harvest -> train every job.

Each stage skips what is already committed (a complete store, a job with done.json),
so running the pipeline again after a crash finishes the work without redoing any.
"""

from __future__ import annotations

import logging

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.harvest.driver import run_harvest
from gemmascope.train.jobs import jobs_from_config
from gemmascope.train.trainer import job_dir, train_job

log = logging.getLogger("gemmascope.pipeline")


def run_pipeline(config: Config, *, ray_address: str | None = None, progress: bool = True) -> list[str]:
    """Run every stage; returns one summary line per stage."""
    lines = [run_harvest(config, ray_address=ray_address, progress=progress).line()]
    for job in jobs_from_config(config):
        if storage.exists(storage.join(job_dir(config, job), "done.json")):
            lines.append(f"train {job.id}: already done ({job_dir(config, job)})")
            continue
        result = train_job(config, job.id, progress=progress)
        lines.append(f"train {job.id}: {result.steps} steps, {result.tokens_per_s:,.0f} tokens/s, "
                     f"SAEs in {result.directory}/saes")
    return lines
