"""The stages chained as idempotent steps: harvest -> sweep -> eval -> export -> report.

Each stage skips what is already committed (a complete store, a job recorded done in
the sweep ledger, an SAE with its metrics.json), so running the pipeline again after a
crash finishes the work without redoing any. The sweep runs the harvest first when the
store is missing.
"""

from __future__ import annotations

from gemmascope.config import Config
from gemmascope.eval.evaluate import run_eval
from gemmascope.export.release import run_export
from gemmascope.report.pages import run_report
from gemmascope.sweep.launcher import run_sweep


def run_pipeline(config: Config, *, ray_address: str | None = None, progress: bool = True) -> list[str]:
    """Run every stage; returns one summary line per stage."""
    summary = run_sweep(config, ray_address=ray_address, progress=progress)
    return [summary.harvest or "harvest: the store was already complete", summary.line(),
            run_eval(config, progress=progress), run_export(config), run_report(config, progress=progress)]
