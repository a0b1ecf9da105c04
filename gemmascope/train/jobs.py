"""Training jobs: the SAEs that share one activation stream, trained together.

A job is every (width, sparsity) SAE of one (site, layer): they read the same rows, so
one loader and one jitted step serve them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemmascope.config import Config
from gemmascope.errors import UserError


@dataclass(frozen=True)
class SAESpec:
    site: str
    layer: int
    width: int
    sparsity: float

    @property
    def name(self) -> str:
        return f"w{self.width}-s{self.sparsity:g}"


@dataclass(frozen=True)
class Job:
    id: str
    site: str
    layer: int
    saes: tuple[SAESpec, ...]


def jobs_from_config(config: Config) -> list[Job]:
    grid = config.saes
    return [
        Job(
            id=f"{site}-L{layer}",
            site=site,
            layer=layer,
            saes=tuple(SAESpec(site, layer, w, s) for w in grid.widths for s in grid.sparsity),
        )
        for site in grid.sites
        for layer in grid.layers
    ]


def find_job(config: Config, job_id: str) -> Job:
    jobs = {job.id: job for job in jobs_from_config(config)}
    if job_id not in jobs:
        raise UserError(f"{config.origin}: no job {job_id!r} (jobs: {', '.join(jobs)})")
    return jobs[job_id]
