"""Attaching to Ray: a real cluster by address, or a local one started on demand.

Workers get the driver's emulator and cache variables, so a job behaves the same on a
laptop's local cluster and on a cluster started elsewhere. A cluster started here runs
no dashboard; Ray's token authentication (on by default) guards the ports it does open.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from gemmascope import faults
from gemmascope.errors import UserError
from gemmascope.huge_pages import worker_env

# Variables that point clients at emulators and caches; workers need the driver's values
# even when they run on a cluster started elsewhere. Credentials (HF_TOKEN, Google's
# application credentials) are not among them: Ray records a job's runtime environment,
# so each node takes its credentials from its own environment instead.
FORWARDED_ENV = (
    "STORAGE_EMULATOR_HOST",
    "TENSORSTORE_GCS_HTTP_URL",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
    "GEMMASCOPE_CACHE",
    "HF_HUB_OFFLINE",
    *faults.VARIABLES,
)


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, when nothing listens at a host:port address:
    `ray.init` retries a dead address for minutes. "auto" and "local" are Ray's to resolve."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"Ray address {address}: no cluster answers there "
                        f"({err.strerror or err}); check --ray-address or RAY_ADDRESS") from None


def connect(address: str | None) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start a local cluster; no-op if connected.

    Without an address Ray would attach to the cluster named in /tmp/ray/ray_current_cluster,
    a file a crashed cluster leaves behind: it then waits minutes on a dead address. "local"
    starts a fresh one, as the command line promises."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    ray.init(
        address=address or "local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"env_vars": {**forwarded_env(), **worker_env()}},
    )
