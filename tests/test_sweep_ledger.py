"""The sweep's job ledger: claims, leases, expiry and attempts, on a local disk and on GCS (emulator)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from gemmascope import versioned
from gemmascope.config import SweepConfig
from gemmascope.sweep.ledger import (
    DONE,
    FAILED,
    PENDING,
    PREEMPTION,
    RUNNING,
    USER_ERROR,
    JobLedger,
    Launcher,
)

SWEEP = SweepConfig(lease_seconds=60.0, heartbeat_seconds=10.0, max_attempts=3)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "gcs"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs_bucket") + "/run"


def remote_launcher(pid: int) -> Launcher:
    """A launcher on another host (its process cannot be checked from here)."""
    return Launcher("elsewhere", pid, "abcd1234")


def test_register_claim_renew_finish(run_dir):
    clock = Clock()
    ledger = JobLedger(run_dir, remote_launcher(1), SWEEP, clock)
    ledger.register(["a", "b"])
    ledger.register(["a"])  # idempotent: the record is not reset
    assert ledger.read("a")["state"] == PENDING
    record = ledger.claim("a")
    assert record["state"] == RUNNING and record["owner"] == "elsewhere:1:abcd1234"
    assert record["lease_expires"] == 1060.0 and record["runs"] == 1 and record["attempts"] == 0
    clock.now = 1050.0
    assert ledger.renew("a")
    assert ledger.read("a")["lease_expires"] == 1110.0
    ledger.finish("a", {"steps": 10})
    done = ledger.read("a")
    assert done["state"] == DONE and done["result"] == {"steps": 10} and done["owner"] is None
    assert ledger.claim("a") is None  # done jobs are never taken again
    assert not ledger.renew("a")


def test_a_live_lease_is_respected_and_an_expired_one_taken_over(run_dir):
    clock = Clock()
    first = JobLedger(run_dir, remote_launcher(1), SWEEP, clock)
    second = JobLedger(run_dir, remote_launcher(2), SWEEP, clock)
    first.register(["job"])
    assert first.claim("job") is not None
    clock.now = 1059.0
    assert second.claim("job") is None  # lease still live
    clock.now = 1061.0  # the first launcher stopped renewing
    taken = second.claim("job")
    assert taken["owner"] == "elsewhere:2:abcd1234"
    assert taken["attempts"] == 1 and "expired" in taken["error"] and taken["runs"] == 2
    assert not first.renew("job")  # the old holder finds out at its next heartbeat
    first.finish("job", {"steps": 1})  # and cannot finish what it no longer holds
    assert second.read("job")["state"] == RUNNING


def test_a_dead_launcher_on_this_host_loses_its_lease_at_once(run_dir):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    clock = Clock()
    dead = JobLedger(run_dir, Launcher(os.uname().nodename, process.pid, "deadbeef"), SWEEP, clock)
    dead.register(["job"])
    assert dead.claim("job") is not None
    alive = JobLedger(run_dir, Launcher.this_process(), SWEEP, clock)
    assert alive.claim("job") is not None  # no waiting for the lease: its process is gone


def test_failures_count_attempts_until_the_job_fails(run_dir):
    ledger = JobLedger(run_dir, remote_launcher(1), SWEEP, Clock())
    ledger.register(["job"])
    for attempt in (1, 2):
        ledger.claim("job")
        assert ledger.fail("job", f"crash {attempt}")["state"] == PENDING
    ledger.claim("job")
    ledger.fail("job", "preempted", cause=PREEMPTION)
    assert ledger.read("job")["attempts"] == 2 and ledger.read("job")["state"] == PENDING
    ledger.claim("job")
    record = ledger.fail("job", "crash 3")
    assert record["state"] == FAILED and record["attempts"] == 3 and record["error"] == "crash 3"
    assert ledger.claim("job") is None
    assert ledger.reopen("job", (FAILED,))
    assert ledger.read("job")["state"] == PENDING and ledger.read("job")["attempts"] == 0


def test_preemptions_have_a_budget_of_their_own(run_dir):
    """Preemptions neither use attempts nor go on for ever: the job survives max_preemptions of
    them and fails at the next, with the count and the last cause in its error."""
    sweep = SweepConfig(lease_seconds=60.0, heartbeat_seconds=10.0, max_attempts=2, max_preemptions=3)
    ledger = JobLedger(run_dir, remote_launcher(1), sweep, Clock())
    ledger.register(["job"])
    ledger.claim("job")
    assert ledger.fail("job", "crash")["state"] == PENDING
    for preemption in (1, 2, 3):
        ledger.claim("job")
        record = ledger.fail("job", f"node {preemption} died", cause=PREEMPTION)
        assert (record["state"], record["attempts"], record["preemptions"]) == (PENDING, 1, preemption)
    ledger.claim("job")
    record = ledger.fail("job", "node 4 died", cause=PREEMPTION)
    assert record["state"] == FAILED and record["preemptions"] == 4
    assert record["error"] == "preempted 4 times (sweep.max_preemptions=3); last: node 4 died"
    assert ledger.reopen("job", (FAILED,))
    assert (ledger.read("job")["attempts"], ledger.read("job")["preemptions"]) == (0, 0)


def test_a_user_error_fails_the_job_at_once(run_dir):
    ledger = JobLedger(run_dir, remote_launcher(1), SWEEP, Clock())
    ledger.register(["job"])
    ledger.claim("job")
    assert ledger.fail("job", "bad store", cause=USER_ERROR)["state"] == FAILED


def test_expired_leases_count_towards_the_attempt_limit(run_dir):
    clock = Clock()
    ledger = JobLedger(run_dir, remote_launcher(1), SweepConfig(lease_seconds=60.0, heartbeat_seconds=10.0,
                                                                 max_attempts=2), clock)
    ledger.register(["job"])
    ledger.claim("job")
    clock.now += 100
    assert ledger.claim("job") is not None  # attempt 1 lost with its launcher
    clock.now += 100
    assert ledger.claim("job") is None  # attempt 2 too: the job is failed, not retried forever
    assert ledger.read("job")["state"] == FAILED


def test_launchers_racing_for_one_job_get_it_once(run_dir):
    ledgers = [JobLedger(run_dir, remote_launcher(pid), SWEEP, Clock()) for pid in range(8)]
    ledgers[0].register(["job"])
    wins = []
    barrier = threading.Barrier(len(ledgers))

    def race(ledger):
        barrier.wait()
        if ledger.claim("job") is not None:
            wins.append(ledger.launcher.pid)

    threads = [threading.Thread(target=race, args=(ledger,)) for ledger in ledgers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert ledgers[0].read("job")["owner"] == f"elsewhere:{wins[0]}:abcd1234"


def test_compare_and_swap_refuses_a_stale_version(run_dir):
    url = f"{run_dir}/sweep/record.json"
    record, version = versioned.read(url)
    assert record is None and version == versioned.ABSENT
    assert versioned.replace(url, {"n": 1}, version)
    assert not versioned.replace(url, {"n": 2}, version)  # someone created it first
    record, version = versioned.read(url)
    assert versioned.replace(url, {"n": 3}, version)
    assert not versioned.replace(url, {"n": 4}, version)  # stale
    assert versioned.read(url)[0] == {"n": 3}


def test_memory_urls_are_refused_with_a_clear_error():
    from gemmascope.errors import UserError

    with pytest.raises(UserError, match="local or gs://"):
        versioned.read("memory://run/sweep/jobs/a.json")


def test_a_gcs_write_whose_answer_was_lost_counts_as_written(gcs_bucket):
    """The retry of a landed write meets its own generation (412): the bytes tell it was ours."""
    url = f"{gcs_bucket}/run/sweep/jobs/job.json"
    record = {"job": "job", "owner": "host:1:abcd", "updated": 1.5}
    assert versioned.replace(url, record, versioned.ABSENT)
    assert versioned.replace(url, record, versioned.ABSENT)  # as the retry sees it
    assert not versioned.replace(url, {**record, "owner": "other:2:ef01"}, versioned.ABSENT)
    assert versioned.read(url)[0] == record
