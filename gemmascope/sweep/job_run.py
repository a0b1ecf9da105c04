"""One training job's run on Ray: an actor per host, placed together, and why it ended.

A single-host job is one actor with the job's resources. A multi-host job reserves its
hosts in one STRICT_SPREAD placement group (a bundle per host, granted all at once, so
a half-placed job never sits on devices waiting for the rest), starts an actor in each
bundle and runs `train_job` in every one as process i of one JAX program; the first
actor picks the coordinator address on its node. Nothing here blocks: the address
travels as an object reference, so the launcher keeps renewing leases while Ray places
the actors (an autoscaling cluster may take minutes to add the nodes).

When a run ends unfinished, `JobRun.cause` tells a preemption from a failure of the job
itself: the trainer checkpointed on SIGTERM, or an actor died because its node was lost
(Ray marks the node dead, or says the node was preempted), is a preemption; an exception
in the trainer, or a worker that died while its node lived on (out of memory, a crash),
is a failure; a user error would fail again. The ledger charges each to its own budget.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict

import ray
from ray.exceptions import ActorDiedError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.sweep.grid import Job
from gemmascope.sweep.ledger import FAILURE, PREEMPTION, USER_ERROR

log = logging.getLogger("gemmascope.sweep")


@ray.remote(max_restarts=0, max_task_retries=0)
class JobHost:
    """One host's share of a job: reports where it runs, then trains."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def coordinator(self) -> str:
        """host:port for JAX's coordinator service on this node (a port free right now)."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def train(self, config: Config, job_id: str, coordinator: str | None, processes: int, process_id: int) -> dict:
        from gemmascope.train.distributed import Distributed
        from gemmascope.train.trainer import train_job

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        dist = Distributed(coordinator, processes, process_id) if processes > 1 else None
        return asdict(train_job(config, job_id, progress=False, dist=dist))


def _bundle(options: dict) -> dict:
    """A placement group bundle holding what one host's actor asks for."""
    bundle = {"CPU": options["num_cpus"], "memory": options["memory"], **options.get("resources", {})}
    if options.get("num_gpus"):
        bundle["GPU"] = options["num_gpus"]
    return bundle


def host_bundles(job: Job) -> list[dict]:
    """One bundle per host of the job (what an autoscaler must provide to run it)."""
    return [_bundle(job.resources.ray_options())] * job.resources.hosts


class JobRun:
    """The actors of one job's run, the references of their `train` calls, and their nodes."""

    def __init__(self, config: Config, job: Job):
        self.job = job
        options = job.resources.ray_options()
        hosts = job.resources.hosts
        self.group = placement_group(host_bundles(job), strategy="STRICT_SPREAD") if hosts > 1 else None
        self.actors = [JobHost.options(name=f"{job.id}/{index}", **options, **self._placement(index)).remote()
                       for index in range(hosts)]
        self.nodes = [actor.node.remote() for actor in self.actors]
        coordinator = self.actors[0].coordinator.remote() if hosts > 1 else None
        self.calls = [actor.train.remote(config, job.id, coordinator, hosts, index)
                      for index, actor in enumerate(self.actors)]
        self.pending = set(self.calls)
        self.result: dict | None = None
        self.error: BaseException | None = None

    def _placement(self, index: int) -> dict:
        if self.group is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)}

    def collect(self, ref) -> bool:
        """Take one finished call's outcome; True when the run is over (all done, or one failed)."""
        self.pending.discard(ref)
        try:
            outcome = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - classified by `cause`
            self.error = err
            return True
        if ref == self.calls[0]:
            self.result = outcome  # every process returns the same figures; the first speaks
        return not self.pending

    def stop(self) -> None:
        """Kill every actor of the run (the others would wait on the lost one) and free its hosts."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)
        self.pending.clear()

    def _node_lost(self) -> bool:
        alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        for ref in self.nodes:
            try:
                node = ray.get(ref, timeout=0)
            except Exception:  # noqa: BLE001 - the actor died before it said where it ran
                continue
            if node not in alive:
                return True
        return False

    def cause(self) -> tuple[str, str]:
        """(ledger cause, message) for the error that ended the run."""
        from gemmascope.train.trainer import Preempted

        err = self.error
        inner = getattr(err, "cause", None) or err
        if isinstance(inner, Preempted):
            return PREEMPTION, str(inner)
        if isinstance(inner, UserError):
            return USER_ERROR, str(inner)
        # In a multi-host run the first error may come from a survivor whose peer vanished.
        if (isinstance(err, ActorDiedError) and err.preempted) or self._node_lost():
            return PREEMPTION, f"{self.job.id}: a node of the run was lost ({_first_line(err)})"
        return FAILURE, str(inner) if isinstance(err, RayTaskError) else repr(inner)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "node" in line.lower()]
    return lines[0] if lines else type(err).__name__
