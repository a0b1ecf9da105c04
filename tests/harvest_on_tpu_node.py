"""Run in a subprocess: a local Ray node that advertises 8 TPU chips (as a TPU VM host
does) harvests with the jax backend; prints the workers' options and assigned resources.

JAX itself runs on the CPU here; what is under test is that the harvest asks Ray for TPU
chips, one worker per `harvest.tpus_per_worker` chips, and that Ray places it there.
"""

from __future__ import annotations

import json
import sys

import ray

from gemmascope.cluster import forwarded_env
from gemmascope.config import load_config
from gemmascope.harvest.actors import actor_options
from gemmascope.harvest.driver import run_harvest


def main(config_path: str, run_dir: str) -> None:
    ray.init(num_cpus=2, resources={"TPU": 8}, include_dashboard=False,
             runtime_env={"env_vars": forwarded_env()})
    config = load_config(config_path, [f"run_dir={run_dir}", "model.backend=jax", "harvest.workers=null",
                                       "harvest.max_tokens=1500", "harvest.unit_rows=512"])
    count, options = actor_options(config)
    summary = run_harvest(config, progress=False)
    print(json.dumps({"count": count, "options": options, "rows": summary.rows}))


if __name__ == "__main__":
    main(*sys.argv[1:])
