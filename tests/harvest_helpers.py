"""Helpers for the harvest tests: run the CLI, snapshot a store, wait on a ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GEMMASCOPE = str(Path(sys.executable).parent / "gemmascope")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([GEMMASCOPE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([GEMMASCOPE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def snapshot(run_dir: str) -> dict:
    """Everything a reader can see in a store, as comparable values (raw bits for arrays)."""
    from gemmascope.store import ActivationStore

    store = ActivationStore.open(run_dir)
    arrays = {}
    for key in store.keys:
        rows = store.read(*key, 0, store.layout.n_rows)
        arrays[key] = np.ascontiguousarray(rows).view(np.uint8).tobytes()
    return {
        "arrays": arrays,
        "tokens": store.token_table().to_pydict(),
        "units": sorted(u for u in store.ledger.committed_units),
        "checksums": {u: info.get("crc32c") for u, info in store.ledger.committed_units.items()},
        "layout": store.ledger.data["layout"],
        "complete": store.complete,
    }


def ledger_units(run_dir: Path) -> tuple[int, bool]:
    """(committed units, complete) of a local store, tolerating a missing ledger."""
    try:
        data = json.loads((run_dir / "activations" / "ledger.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0, False
    return len(data["units"]), data["complete"]


def wait_for_units(run_dir: Path, process: subprocess.Popen, at_least: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        units, complete = ledger_units(run_dir)
        if complete or process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"harvest ended before it could be interrupted (rc={process.returncode}):\n{err[-3000:]}")
        if units >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {at_least} committed units within {timeout} s")
