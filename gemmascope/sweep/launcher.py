"""`gemmascope sweep CONFIG`: run every unfinished job of the grid on Ray, resumably.

The launcher plans the jobs, makes sure the activation store they read exists (running
the harvest under a lease of its own when the config allows), then claims jobs in the
ledger and runs each as a Ray task with the job's resources. While it runs, it renews
its leases; a job held by another live launcher is left alone, and one whose launcher
died is taken over when its lease expires. A task that fails is retried up to
sweep.max_attempts; a user error (bad input, which would fail again) fails its job at
once; a preempted job goes back to pending without using up an attempt. Training
itself resumes from the job's last checkpoint, so a rerun loses at most the steps
since then.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

import ray
from ray.exceptions import RayTaskError, TaskCancelledError
from tqdm import tqdm

from gemmascope import storage
from gemmascope.cluster import connect
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.faults import crash_point
from gemmascope.sweep.grid import Job
from gemmascope.sweep.ledger import DONE, FAILED, RUNNING, JobLedger, Launcher
from gemmascope.sweep.plan import model_shape, write_plan
from gemmascope.train.trainer import Preempted, logged_metrics

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


@ray.remote(max_retries=0)
def _train_task(config: Config, job_id: str) -> dict:
    from gemmascope.train.trainer import train_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return asdict(train_job(config, job_id, progress=False))


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
    """How many tasks with this job's resources the cluster can run at once (at least 1)."""
    total = ray.cluster_resources()
    options = job.resources.ray_options()
    needs = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    fits = [int(total.get(name, 0) // amount) for name, amount in needs.items() if amount]
    return max(1, min(fits))


def _cause(err: BaseException) -> BaseException:
    return getattr(err, "cause", None) or err


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
            ledger.fail(HARVEST, str(err), final=True)
            raise
        except BaseException as err:
            ledger.fail(HARVEST, repr(err))
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
    running: dict = {}  # ObjectRef -> job id
    tokens_run = 0
    run_now = 0
    total_steps = sum(job.steps(batch) for job in jobs)
    with tqdm(total=total_steps, desc="sweep", unit="step", disable=not progress) as bar:
        while True:
            records = ledger.records(longest_first)
            mine = set(running.values())
            for job_id, record in records.items():
                if job_id in mine or record["state"] in (DONE, FAILED):
                    continue
                if record["state"] == RUNNING and not ledger.lease_expired(record):
                    continue
                job = by_id[job_id]
                connect(ray_address)  # only once there is something to run
                if len(running) >= _capacity(job):  # claim only what can start now
                    break
                if ledger.claim(job_id) is None:
                    continue
                crash_point("sweep.claimed")  # holds a lease, has started nothing
                heartbeat.hold(job_id)
                ref = _train_task.options(name=job_id, **job.resources.ray_options()).remote(config, job_id)
                running[ref] = job_id
                res = job.resources
                log.info("%s: started: %d SAEs on %d %s (mesh %d x %d)", job_id, len(job.saes), res.devices,
                         res.accelerator, res.mesh_data, res.mesh_latent)
            records = ledger.records(list(by_id))
            bar.n = sum(job.steps(batch) if records[job.id]["state"] == DONE
                        else _latest_step(config, job) for job in jobs)
            active = sum(1 for r in records.values() if r["state"] == RUNNING)
            bar.set_postfix(done=sum(r["state"] == DONE for r in records.values()), running=active,
                            failed=sum(r["state"] == FAILED for r in records.values()))
            bar.refresh()
            if not running and active == 0:
                break
            if not running:  # only other launchers' jobs are left: watch their leases
                time.sleep(config.sweep.heartbeat_seconds)
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=config.sweep.heartbeat_seconds)
            for job_id in sorted(heartbeat.lost):
                for ref, held in list(running.items()):
                    if held == job_id:
                        ray.cancel(ref, force=True)
                        del running[ref]
                heartbeat.lost.discard(job_id)
            for ref in finished:
                job_id = running.pop(ref, None)
                if job_id is None:
                    continue
                heartbeat.drop(job_id)
                outcome = _collect(ref, job_id, ledger)
                if outcome:
                    run_now += 1
                    tokens_run += outcome["steps_run"] * batch
    records = ledger.records(list(by_id))
    seconds = time.perf_counter() - began
    failed = {job_id: r["error"] for job_id, r in records.items() if r["state"] == FAILED}
    return SweepSummary(len(jobs), sum(r["state"] == DONE for r in records.values()), failed, run_now,
                        tokens_run / seconds if seconds else 0.0, seconds, harvested)


def _collect(ref, job_id: str, ledger: JobLedger) -> dict | None:
    """Record a finished task in the ledger; its result if it trained to the end."""
    try:
        result = ray.get(ref)
    except TaskCancelledError:
        return None
    except Exception as err:  # noqa: BLE001 - every failure is recorded, then classified
        cause = _cause(err)
        if isinstance(cause, Preempted):
            ledger.fail(job_id, str(cause), counts=False)
            log.warning("%s: preempted; pending again", job_id)
        elif isinstance(cause, UserError):
            ledger.fail(job_id, str(cause), final=True)
            log.error("%s: failed: %s", job_id, cause)
        else:
            record = ledger.fail(job_id, repr(cause) if not isinstance(err, RayTaskError) else str(cause))
            state = record["state"] if record else "?"
            log.warning("%s: attempt failed (%r); now %s", job_id, cause, state)
        return None
    ledger.finish(job_id, result)
    log.info("%s: done (%d steps, %d run now, %.0f tokens/s)", job_id, result["steps"], result["steps_run"],
             result["tokens_per_s"])
    return result
