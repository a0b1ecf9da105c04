"""The torch backend's launch and collect: each forward on one background thread, in order,
its rows what the capture hooks see, and a failed forward reported where it is collected."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from gemmascope.config import ModelConfig
from gemmascope.models.capture import ActivationCapture
from gemmascope.models.torch_forward import TorchForward

KEYS = (("res", 0), ("mlp", 1), ("att", 3))


@pytest.fixture(scope="module")
def backend() -> TorchForward:
    return TorchForward(ModelConfig(source="tiny-gemma2"))


def reference(backend: TorchForward, ids: np.ndarray, rows: np.ndarray) -> dict:
    """The captured activations at `rows` of the flattened batch, from the hooks directly."""
    captured = ActivationCapture(backend.loaded, KEYS)(torch.from_numpy(ids.astype(np.int64)))
    return {key: value.reshape(-1, value.shape[-1])[torch.from_numpy(rows)].numpy() for key, value in captured.items()}


def test_two_batches_in_flight_come_back_as_their_own_rows_from_another_thread(backend):
    rng = np.random.default_rng(0)
    batches = [(rng.integers(3, backend.info.vocab_size, size=(2, 16)), np.array(rows))
               for rows in ([0, 5, 17, 31], [2, 3, 30])]
    threads = []
    hook = backend.loaded.decoder_layers[0].register_forward_hook(
        lambda *_: threads.append(threading.current_thread()))
    try:
        pending = [backend.launch(ids, KEYS, rows, "float32") for ids, rows in batches]
        got = [backend.collect(p) for p in reversed(pending)][::-1]
    finally:
        hook.remove()
    assert len(threads) == 2 and threading.current_thread() not in threads
    for (ids, rows), rows_of_batch in zip(batches, got, strict=True):
        expected = reference(backend, ids, rows)
        assert set(rows_of_batch) == set(KEYS)
        for key in KEYS:
            np.testing.assert_array_equal(rows_of_batch[key].gathered(), expected[key], err_msg=str(key))


def test_a_failed_forward_raises_at_collect_and_the_next_batch_still_runs(backend):
    ids = np.full((1, 8), 5)
    pending = backend.launch(ids, KEYS, np.array([0, 99]), "float32")  # row 99 of 8 positions
    with pytest.raises((IndexError, RuntimeError)):
        backend.collect(pending)
    rows = backend.collect(backend.launch(ids, KEYS, np.array([0, 7]), "float32"))
    assert all(len(rows[key]) == 2 for key in KEYS)
