"""`gemmascope sweep CONFIG`: run every unfinished job of the grid on Ray, resumably.

The launcher plans the jobs, makes sure the activation store they read exists (running
the harvest under a lease of its own when the config allows), then claims jobs in the
ledger and runs each on Ray with the job's resources: an actor per host
(`gemmascope.sweep.job_run`). While they run, it renews its leases; a job held by
another live launcher is left alone, and one whose launcher died is taken over when its
lease expires. A run that fails is retried up to sweep.max_attempts; a user error (bad
input, which would fail again) fails its job at once; a preempted run (its node lost,
or SIGTERM) goes back to pending on a budget of its own (sweep.max_preemptions) and is
started again, wherever Ray finds room, without anyone rerunning the sweep. Training
resumes from the job's last checkpoint, so a rerun loses at most the steps since then.

On an autoscaling cluster the launcher asks for the hosts of every unfinished job
(`request_resources`), so nodes are added for all of them at once, and it starts jobs
as the nodes join.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
from ray.autoscaler.sdk import request_resources
from tqdm import tqdm

from gemmascope import storage
from gemmascope.cluster import connect
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.faults import crash_point
from gemmascope.sweep.grid import Job
from gemmascope.sweep.job_run import JobRun, host_bundles
from gemmascope.sweep.ledger import (
    DONE,
    FAILED,
    FAILURE,
    PREEMPTION,
    RUNNING,
    USER_ERROR,
    JobLedger,
    Launcher,
)
from gemmascope.sweep.plan import model_shape, write_plan
from gemmascope.train.trainer import logged_metrics

log = logging.getLogger("gemmascope.sweep")

HARVEST = "harvest"  # the ledger record of the harvest step (job ids always contain "-L")


@dataclass(frozen=True)
class SweepSummary:
    jobs: int
    done: int
    failed: dict[str, str]  # job -> error
    run_now: int
    tokens_per_s: float  # tokens trained by this launcher per second of its training phase
    seconds: float  # the training phase
    harvest: str | None  # the harvest's summary line, if this launcher harvested

    def line(self) -> str:
        text = (f"sweep: {self.done}/{self.jobs} jobs done ({self.run_now} run now, "
                f"{self.tokens_per_s:,.0f} training tokens/s, {self.seconds:.1f} s)")
        if self.failed:
            text += "; failed: " + "; ".join(f"{job}: {error}" for job, error in self.failed.items())
        return text


class _Heartbeat(threading.Thread):
    """Renews this launcher's leases; a lease found taken is reported in `lost`."""

    def __init__(self, ledger: JobLedger, interval: float):
        super().__init__(daemon=True, name="lease-heartbeat")
        self.ledger = ledger
        self.interval = interval
        self.held: set[str] = set()
        self.lost: set[str] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def hold(self, job_id: str) -> None:
        with self.lock:
            self.held.add(job_id)

    def drop(self, job_id: str) -> None:
        with self.lock:
            self.held.discard(job_id)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                held = sorted(self.held)
            for job_id in held:
                try:
                    renewed = self.ledger.renew(job_id)
                except Exception as err:  # noqa: BLE001 - a missed renewal is retried next beat
                    log.warning("%s: could not renew the lease: %r", job_id, err)
                    continue
                if not renewed:
                    log.warning("%s: lease lost to another launcher", job_id)
                    with self.lock:
                        self.held.discard(job_id)
                        self.lost.add(job_id)

    def stop(self) -> None:
        self.stopped.set()


def _capacity(job: Job) -> int:
    """How many runs of this job's shape the cluster can hold now (at least 1: Ray queues the
    rest, and an autoscaler adds nodes for it)."""
    total = ray.cluster_resources()
    options = job.resources.ray_options()
    needs = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    fits = [int(total.get(name, 0) // amount) for name, amount in needs.items() if amount]
    return max(1, min(fits) // job.resources.hosts)


def _request_hosts(jobs: list[Job]) -> None:
    """Tell an autoscaler the hosts every unfinished job needs (replacing the last request)."""
    request_resources(bundles=[bundle for job in jobs for bundle in host_bundles(job)])


def _store_ready(config: Config, jobs: list[Job]) -> str | None:
    """None if the store has every array the jobs read, else what is missing."""
    from gemmascope.store import ActivationStore

    try:
        store = ActivationStore.open(config.run_dir)
    except UserError:
        return f"{storage.join(storage.normalize(config.run_dir), 'activations')}: no activation store"
    needed = sorted({(site, job.layer) for job in jobs for site in (job.site, job.target)})
    missing = [f"{site}/layer_{layer}" for site, layer in needed if (site, layer) not in store.d_in]
    if missing:
        return f"{store.url}: no arrays for {', '.join(missing)}"
    if not store.complete:
        return f"{store.url}: the harvest is not complete"
    return None


def _ensure_store(config: Config, jobs: list[Job], ledger: JobLedger, heartbeat: _Heartbeat,
                  ray_address: str | None, progress: bool) -> str | None:
    """Harvest first if the store is missing or incomplete (one launcher at a time); its summary."""
    from gemmascope.harvest.driver import run_harvest

    harvested = None
    while (missing := _store_ready(config, jobs)) is not None:
        if not config.sweep.harvest:
            raise UserError(f"{missing}; run `gemmascope harvest {config.origin}` first "
                            "(or set sweep.harvest: true)")
        ledger.register([HARVEST])
        ledger.reopen(HARVEST)  # finished before, yet the store is not ready: harvest again
        if ledger.claim(HARVEST) is None:
            log.info("harvest: running under another launcher; waiting")
            time.sleep(config.sweep.heartbeat_seconds)
            continue
        heartbeat.hold(HARVEST)
        log.info("%s; harvesting first", missing)
        try:
            summary = run_harvest(config, ray_address=ray_address, progress=progress)
        except UserError as err:
            ledger.fail(HARVEST, str(err), cause=USER_ERROR)
            raise
        except BaseException as err:
            ledger.fail(HARVEST, repr(err), cause=FAILURE)
            raise
        finally:
            heartbeat.drop(HARVEST)
        ledger.finish(HARVEST, {"line": summary.line()})
        harvested = summary.line()
    return harvested


def _latest_step(config: Config, job: Job) -> int:
    """The last logged step of a job (for the progress bar), 0 if none."""
    records = logged_metrics(config, job.id)
    return records[-1]["step"] if records else 0


def run_sweep(config: Config, *, ray_address: str | None = None, progress: bool = True,
              retry_failed: bool = False) -> SweepSummary:
    jobs = write_plan(config, model_shape(config))
    by_id = {job.id: job for job in jobs}
    ledger = JobLedger(config.run_dir, Launcher.this_process(), config.sweep)
    ledger.register(list(by_id))
    if retry_failed:
        for job_id in by_id:
            if ledger.reopen(job_id, (FAILED,)):
                log.info("%s: failed before; pending again (--retry-failed)", job_id)
    heartbeat = _Heartbeat(ledger, config.sweep.heartbeat_seconds)
    heartbeat.start()
    try:
        harvested = _ensure_store(config, jobs, ledger, heartbeat, ray_address, progress)
        return _run_jobs(config, jobs, ledger, heartbeat, progress, harvested, ray_address)
    finally:
        heartbeat.stop()


def _run_jobs(config: Config, jobs: list[Job], ledger: JobLedger, heartbeat: _Heartbeat,
              progress: bool, harvested: str | None, ray_address: str | None) -> SweepSummary:
    began = time.perf_counter()
    by_id = {job.id: job for job in jobs}
    # Longest jobs first, so the sweep does not end waiting on one big job started last.
    longest_first = sorted(by_id, key=lambda job_id: -by_id[job_id].flops())
    batch = config.train.batch_size
    runs: dict[str, JobRun] = {}  # job id -> its run, for the jobs this launcher runs
    tokens_run = 0
    run_now = 0
    total_steps = sum(job.steps(batch) for job in jobs)
    requested: list[str] | None = None
    with tqdm(total=total_steps, desc="sweep", unit="step", disable=not progress) as bar:
        while True:
            records = ledger.records(longest_first)
            unfinished = [job_id for job_id in longest_first if records[job_id]["state"] not in (DONE, FAILED)]
            for job_id in unfinished:
                record = records[job_id]
                if job_id in runs or (record["state"] == RUNNING and not ledger.lease_expired(record)):
                    continue
                job = by_id[job_id]
                connect(ray_address)  # only once there is something to run
                if unfinished != requested:
                    _request_hosts([by_id[j] for j in unfinished])
                    requested = unfinished
                if len(runs) >= _capacity(job):  # claim only what can start now
                    break
                if ledger.claim(job_id) is None:
                    continue
                crash_point("sweep.claimed")  # holds a lease, has started nothing
                heartbeat.hold(job_id)
                runs[job_id] = JobRun(config, job)
                res = job.resources
                hosts = f"{res.hosts} hosts x " if res.hosts > 1 else ""
                log.info("%s: started: %d SAEs on %s%d %s (mesh %d x %d)", job_id, len(job.saes), hosts,
                         res.devices, res.accelerator, res.mesh_data, res.mesh_latent)
            records = ledger.records(list(by_id))
            bar.n = sum(job.steps(batch) if records[job.id]["state"] == DONE
                        else _latest_step(config, job) for job in jobs)
            active = sum(1 for r in records.values() if r["state"] == RUNNING)
            bar.set_postfix(done=sum(r["state"] == DONE for r in records.values()), running=active,
                            failed=sum(r["state"] == FAILED for r in records.values()))
            bar.refresh()
            if not runs and active == 0:
                break
            if not runs:  # only other launchers' jobs are left: watch their leases
                time.sleep(config.sweep.heartbeat_seconds)
                continue
            owner = {ref: job_id for job_id, run in runs.items() for ref in run.pending}
            finished, _ = ray.wait(list(owner), num_returns=1, timeout=config.sweep.heartbeat_seconds)
            for job_id in sorted(heartbeat.lost):
                if job_id in runs:
                    runs.pop(job_id).stop()
                heartbeat.lost.discard(job_id)
            for ref in finished:
                run = runs.get(owner[ref])
                if run is None or not run.collect(ref):
                    continue
                del runs[run.job.id]
                heartbeat.drop(run.job.id)
                outcome = _settle(run, ledger)
                if outcome:
                    run_now += 1
                    tokens_run += outcome["steps_run"] * batch
    if requested:
        request_resources(bundles=[])  # nothing left to scale for
    records = ledger.records(list(by_id))
    seconds = time.perf_counter() - began
    failed = {job_id: r["error"] for job_id, r in records.items() if r["state"] == FAILED}
    return SweepSummary(len(jobs), sum(r["state"] == DONE for r in records.values()), failed, run_now,
                        tokens_run / seconds if seconds else 0.0, seconds, harvested)


def _settle(run: JobRun, ledger: JobLedger) -> dict | None:
    """Record a finished run in the ledger and free its actors; its result if it trained to the end."""
    run.stop()
    job_id = run.job.id
    if run.error is None:
        ledger.finish(job_id, run.result)
        result = run.result
        log.info("%s: done (%d steps, %d run now, %.0f tokens/s)", job_id, result["steps"], result["steps_run"],
                 result["tokens_per_s"])
        return result
    cause, message = run.cause()
    record = ledger.fail(job_id, message, cause=cause)
    state = record["state"] if record else "?"
    if cause == PREEMPTION:
        log.warning("%s: preempted (%s); now %s, resuming from its last checkpoint when restarted", job_id,
                    message, state)
    elif cause == USER_ERROR:
        log.error("%s: failed: %s", job_id, message)
    else:
        log.warning("%s: attempt failed (%s); now %s", job_id, message, state)
    return None
