"""Run one `gemmascope train` job as N processes on loopback: the multi-host path on one machine.

Each process is the real command a Slurm or TPU-pod user runs (`--coordinator
127.0.0.1:<free port> --processes N --process-id I`), with its own forced CPU devices,
so JAX's coordinator, the cross-process (gloo) collectives, Orbax's multi-process
checkpoints and the writer-only files are all exercised. One process (no flags) runs
the single-host reference the same way. A process group never outlives its call:
when one process fails the others get a grace period to fail on their own (a peer's
death can leave them waiting in a collective), then are killed, as on any deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gemmascope.faults import VARIABLES

ROOT = Path(__file__).resolve().parent.parent
GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")
GRACE_S = 30.0


@dataclass(frozen=True)
class Process:
    popen: subprocess.Popen
    stdout: IO[str]  # files, not pipes: a pipe nobody reads while we wait would stall a chatty process
    stderr: IO[str]

    def result(self) -> subprocess.CompletedProcess:
        self.popen.wait()
        outputs = []
        for handle in (self.stdout, self.stderr):
            handle.seek(0)
            outputs.append(handle.read())
            handle.close()
        return subprocess.CompletedProcess(self.popen.args, self.popen.returncode, *outputs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(config_path: str, job: str, *, processes: int, devices: int,
          env: dict[str, str] | None = None) -> list[Process]:
    """`processes` copies of `gemmascope train` (multi-host flags when more than one), each
    seeing `devices` CPU devices."""
    inherited = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    environment = {**inherited, **(env or {}), "PYTHONPATH": str(ROOT),
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [GEMMASCOPE, "train", config_path, "--job", job, "--no-progress"]
    port = free_port()
    group = []
    for index in range(processes):
        flags = ["--coordinator", f"127.0.0.1:{port}", "--processes", str(processes),
                 "--process-id", str(index)] if processes > 1 else []
        stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in result()
        popen = subprocess.Popen([*command, *flags], cwd=ROOT, env=environment, stdout=stdout, stderr=stderr)
        group.append(Process(popen, stdout, stderr))
    return group


def finish(group: list[Process], timeout: float = 300.0) -> list[subprocess.CompletedProcess]:
    """Wait for every process; kill the rest `GRACE_S` after one fails, and all at `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.popen.poll() is None for p in group):
        if any(p.popen.returncode not in (None, 0) for p in group):
            deadline = min(deadline, time.monotonic() + GRACE_S)
        time.sleep(0.1)
    for process in group:
        if process.popen.poll() is None:
            process.popen.kill()
    return [process.result() for process in group]


def run(config_path: str, job: str, *, timeout: float = 300.0, **options) -> list[subprocess.CompletedProcess]:
    return finish(start(config_path, job, **options), timeout)


def report(results: list[subprocess.CompletedProcess]) -> str:
    """Each process's exit status and the end of its stderr, for an assertion message."""
    return "\n".join(f"--- process {index}: exit {result.returncode}\n{result.stderr[-3000:]}"
                     for index, result in enumerate(results))
