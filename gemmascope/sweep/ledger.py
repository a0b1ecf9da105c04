"""The sweep's job ledger: one record per job under RUN/sweep/jobs/, updated by compare-and-swap.

A record is pending, running (with the launcher that holds it and a lease that launcher
renews), done, or failed (with the error, the attempt count and the preemption count).
Attempts count failures of the job itself; preemptions (its node taken away, SIGTERM)
have a budget of their own, so a spot cluster's churn does not use up the attempts
that catch a job which fails again and again. Every change is a
compare-and-swap on the record (`gemmascope.versioned`), so of two launchers that try to
claim a job at once exactly one wins, and a launcher that stops renewing its lease loses
the job to the next one once the lease has expired. A launcher on the same host whose
process is gone loses its leases at once. Leases compare wall clocks across hosts, so
lease_seconds should dwarf any clock skew.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from gemmascope import storage, versioned
from gemmascope.config import SweepConfig

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"
# Why a run ended without finishing: what `JobLedger.fail` charges it to.
FAILURE, PREEMPTION, USER_ERROR = "failure", "preemption", "user error"


@dataclass(frozen=True)
class Launcher:
    host: str
    pid: int
    token: str

    @classmethod
    def this_process(cls) -> Launcher:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


def _process_gone(label: str) -> bool:
    """True when `label` is a launcher on this host whose process no longer exists."""
    host, _, rest = label.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobLedger:
    def __init__(self, run_dir: str, launcher: Launcher, sweep: SweepConfig, clock=time.time):
        self.root = storage.join(storage.normalize(run_dir), "sweep", "jobs")
        self.launcher = launcher
        self.sweep = sweep
        self.clock = clock

    def url(self, job_id: str) -> str:
        return storage.join(self.root, f"{job_id}.json")

    def read(self, job_id: str) -> dict | None:
        return versioned.read(self.url(job_id))[0]

    def records(self, job_ids: list[str]) -> dict[str, dict | None]:
        return {job_id: self.read(job_id) for job_id in job_ids}

    def _update(self, job_id: str, change) -> dict | None:
        """Apply `change(record) -> new record or None (no change)` atomically; retried on conflict."""
        while True:
            record, version = versioned.read(self.url(job_id))
            new = change(record)
            if new is None:
                return None
            new["updated"] = self.clock()
            if versioned.replace(self.url(job_id), new, version):
                return new

    def register(self, job_ids: list[str]) -> None:
        """A pending record for every job that has none yet."""
        for job_id in job_ids:
            self._update(job_id, lambda record, job_id=job_id: None if record else {
                "job": job_id, "state": PENDING, "attempts": 0, "preemptions": 0, "runs": 0, "owner": None,
                "lease_expires": None, "error": None})

    def lease_expired(self, record: dict) -> bool:
        return record["lease_expires"] < self.clock() or _process_gone(record["owner"])

    def claim(self, job_id: str) -> dict | None:
        """Take the job if it is pending or its holder's lease has expired; the new record or None."""
        def change(record: dict | None) -> dict | None:
            if record is None or record["state"] in (DONE, FAILED):
                return None
            record = dict(record)
            if record["state"] == RUNNING:
                if not self.lease_expired(record):
                    return None
                # Its launcher vanished mid-run: that counts as a failed attempt.
                record["attempts"] += 1
                record["error"] = f"lease of {record['owner']} expired"
                if record["attempts"] >= self.sweep.max_attempts:
                    return {**record, "state": FAILED, "owner": None, "lease_expires": None}
            now = self.clock()
            return {**record, "state": RUNNING, "owner": self.launcher.label, "runs": record["runs"] + 1,
                    "lease_expires": now + self.sweep.lease_seconds, "heartbeat": now}

        record = self._update(job_id, change)
        return record if record and record["state"] == RUNNING else None

    def _mine(self, record: dict | None) -> bool:
        return bool(record) and record["state"] == RUNNING and record["owner"] == self.launcher.label

    def renew(self, job_id: str) -> bool:
        """Extend this launcher's lease; False if the job is no longer held by it."""
        def change(record):
            if not self._mine(record):
                return None
            now = self.clock()
            return {**record, "lease_expires": now + self.sweep.lease_seconds, "heartbeat": now}

        return self._update(job_id, change) is not None

    def finish(self, job_id: str, result: dict) -> None:
        self._update(job_id, lambda record: {**record, "state": DONE, "owner": None, "lease_expires": None,
                                             "error": None, "result": result} if self._mine(record) else None)

    def fail(self, job_id: str, error: str, *, cause: str = FAILURE) -> dict | None:
        """Give the job back after it stopped unfinished: pending again while its budget lasts.

        A FAILURE uses one of sweep.max_attempts, a PREEMPTION one of sweep.max_preemptions;
        a USER_ERROR (bad input, which would fail again) fails the job at once.
        """
        def change(record):
            if not self._mine(record):
                return None
            attempts = record["attempts"] + (cause == FAILURE)
            preemptions = record.get("preemptions", 0) + (cause == PREEMPTION)
            spent = attempts >= self.sweep.max_attempts or preemptions > self.sweep.max_preemptions
            message = error
            if cause == PREEMPTION and preemptions > self.sweep.max_preemptions:
                message = f"preempted {preemptions} times (sweep.max_preemptions={self.sweep.max_preemptions}); " \
                          f"last: {error}"
            state = FAILED if cause == USER_ERROR or spent else PENDING
            return {**record, "state": state, "attempts": attempts, "preemptions": preemptions, "owner": None,
                    "lease_expires": None, "error": message}

        return self._update(job_id, change)

    def reopen(self, job_id: str, states: tuple[str, ...] = (DONE, FAILED)) -> bool:
        """A finished job (in `states`) back to pending with fresh attempt and preemption counts."""
        return self._update(job_id, lambda record: {**record, "state": PENDING, "attempts": 0, "preemptions": 0}
                            if record and record["state"] in states else None) is not None
