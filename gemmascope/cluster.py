"""Attaching to Ray: a real cluster by address, or a local one started on demand.

Workers get the driver's emulator and cache variables, so a job behaves the same on a
laptop's local cluster and on a cluster started elsewhere. A cluster started here runs
no dashboard; Ray's token authentication (on by default) guards the ports it does open.
"""

from __future__ import annotations

import logging
import os

import ray

from gemmascope import faults

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


def connect(address: str | None) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start a local cluster; no-op if connected."""
    if ray.is_initialized():
        return
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        runtime_env={"env_vars": forwarded_env()},
    )
