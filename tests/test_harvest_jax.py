"""Harvests with `model.backend: jax` through the same Ray driver, store and ledger.

The store a JAX harvest writes must be the torch harvest's store: the same layout, token
table and units, activations equal to float32 tolerance (and within one bfloat16 step
when stored as bfloat16), every checksum verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gemmascope.config import load_config
from gemmascope.harvest.driver import run_harvest
from gemmascope.store import ActivationStore
from tests.harvest_helpers import ROOT

pytestmark = pytest.mark.ray

TINY = str(ROOT / "configs" / "tiny-gemma2.yaml")
SMALL = ["harvest.max_tokens=2500", "harvest.unit_rows=1024"]


def harvest(run_dir, *overrides) -> ActivationStore:
    run_harvest(load_config(TINY, [f"run_dir={run_dir}", *SMALL, *overrides]), progress=False)
    store = ActivationStore.open(str(run_dir))
    assert store.complete
    assert store.verify() == len(store.ledger.committed_units) * len(store.keys)
    return store


@pytest.fixture(scope="module", params=["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def store_pair(request, ray_address, tmp_path_factory):
    """(torch store, jax store) of the same harvest, stored in the param's dtype."""
    dtype = request.param
    root = tmp_path_factory.mktemp(f"backends-{dtype}")
    pair = tuple(harvest(root / backend, f"model.backend={backend}", f"harvest.store_dtype={dtype}")
                 for backend in ("torch", "jax"))
    return dtype, *pair


def test_jax_store_equals_torch_store(store_pair):
    dtype, torch_store, jax_store = store_pair
    assert jax_store.keys == torch_store.keys and len(jax_store.keys) == 16
    assert jax_store.ledger.data["layout"] == torch_store.ledger.data["layout"]
    assert jax_store.token_table().equals(torch_store.token_table())
    assert jax_store.ledger.data["identity"]["model"]["backend"] == "jax"
    for key in torch_store.keys:
        want = torch_store.read(*key, 0, torch_store.n_rows).astype(np.float64)
        got = jax_store.read(*key, 0, jax_store.n_rows).astype(np.float64)
        if dtype == "float32":
            assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, key
        else:
            # Values a hair apart in float32 (1e-5 of the largest) may round to
            # neighbouring bfloat16 numbers (2^-7 relative apart).
            assert (np.abs(got - want) <= np.abs(want) * 2.0**-7 + 1e-5 * np.abs(want).max()).all(), key
            assert (got == want).mean() > 0.95, key
    # Resuming a torch store with the jax backend is refused: rows would mix two numerics.
    assert torch_store.ledger.data["fingerprint"] != jax_store.ledger.data["fingerprint"]


def test_tpu_host_workers_request_tpu_chips(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "harvest_on_tpu_node.py"), TINY,
                             str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"count": 2, "options": {"resources": {"TPU": 4}, "num_cpus": 1}, "rows": 1500}
    store = ActivationStore.open(str(tmp_path / "run"))
    assert store.complete and store.ledger.data["identity"]["model"]["backend"] == "jax"
