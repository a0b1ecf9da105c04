"""The Ray side of the harvest: one model actor per TPU host (jax backend), per GPU, or
per `cpus_per_worker` CPUs.

Actors restart when their process dies (the driver re-queues the unit); the driver, not
Ray, decides how often a unit is retried, so a failing unit ends the run with its error
instead of looping.
"""

from __future__ import annotations

import os

import ray

from gemmascope.config import Config
from gemmascope.harvest.sources import SourceShard
from gemmascope.store.layout import Layout, ShardStats


@ray.remote(max_restarts=-1, max_task_retries=0)
class HarvestActor:
    def __init__(self, config: Config, activations: str, threads: int):
        from transformers.utils import logging as hf_logging

        from gemmascope.harvest.worker import HarvestWorker

        hf_logging.disable_progress_bar()  # one bar per actor start is noise in the driver's log

        if config.model.backend == "torch":
            import torch

            if not torch.cuda.is_available() or config.model.device == "cpu":
                torch.set_num_threads(threads)
        self.worker = HarvestWorker(config, activations)

    def pid(self) -> int:
        return os.getpid()

    def tokenize_shard(self, shard: SourceShard) -> ShardStats:
        return self.worker.tokenize_shard(shard)

    def harvest_unit(self, unit: int, layout: Layout):
        return self.worker.harvest_unit(unit, layout)


def actor_options(config: Config) -> tuple[int, dict]:
    """How many actors to start and the resources each reserves."""
    resources = ray.cluster_resources()
    h = config.harvest
    tpus = resources.get("TPU", 0.0)
    if tpus and config.model.backend == "jax" and config.model.device in ("auto", "tpu"):
        count = h.workers or max(1, int(tpus // h.tpus_per_worker))
        return count, {"resources": {"TPU": h.tpus_per_worker}, "num_cpus": 1}
    gpus = resources.get("GPU", 0.0)
    if gpus and config.model.device != "cpu":
        count = h.workers or max(1, int(gpus // h.gpus_per_worker))
        return count, {"num_gpus": h.gpus_per_worker, "num_cpus": 1}
    cpus = max(1, int(resources.get("CPU", 1)))
    per_worker = min(h.cpus_per_worker, cpus)
    count = h.workers or max(1, cpus // per_worker)
    return count, {"num_cpus": per_worker}
