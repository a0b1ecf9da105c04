"""The torch backend as the harvest sees it: transformers' model with capture hooks.

Positions are gathered and cast to the store dtype on the model's device, inside the
hooks, so full-size activations never reach the host.

`launch` hands the forward and the copy of its rows to the host to one background
thread and returns, as the JAX backend's asynchronous dispatch does: the harvest worker
keeps one batch in flight, so the next batch's forward (and, on a GPU, its copy to the
host) runs while the worker hands the last batch's rows to the writers. One thread runs
the forwards in order, so the capture hooks of two batches never meet; torch releases
the GIL inside its kernels.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from gemmascope.config import ModelConfig
from gemmascope.models.backends import KeptRows
from gemmascope.models.capture import ActivationCapture, bare_forward
from gemmascope.models.loading import LoadedModel, load_model
from gemmascope.models.sites import Key
from gemmascope.store.arrays import NUMPY_DTYPES

TORCH_STORE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class TorchForward:
    def __init__(self, config: ModelConfig | None = None, loaded: LoadedModel | None = None):
        self.loaded = loaded or load_model(config)
        self.info = self.loaded.info
        self.tokenizer = self.loaded.tokenizer
        self._captures: dict[tuple[Key, ...], ActivationCapture] = {}
        self._forwards = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-forward")

    def launch(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
               store_dtype: str) -> Future:
        """Starts the forward on the background thread and returns at once."""
        return self._forwards.submit(self._forward, input_ids, keys, flat_rows, store_dtype)

    def collect(self, pending: Future) -> dict[Key, KeptRows]:
        """Waits for a launched forward; its exception, if it raised, is raised here."""
        return pending.result()

    def _forward(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
                 store_dtype: str) -> dict[Key, KeptRows]:
        """The forward to the end (the hooks gather `flat_rows` on the device), its rows on the host."""
        capture = self._captures.get(keys) or self._captures.setdefault(keys, ActivationCapture(self.loaded, keys))
        flat = torch.from_numpy(flat_rows).to(self.loaded.device)
        dtype = TORCH_STORE_DTYPES[store_dtype]

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, t.shape[-1]).index_select(0, flat).to(dtype)

        captured = capture(torch.from_numpy(input_ids.astype(np.int64)), transform=gather)
        return {key: KeptRows(_to_numpy(tensor)) for key, tensor in captured.items()}

    def capture(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
                store_dtype: str) -> dict[Key, np.ndarray]:
        return {key: rows.gathered() for key, rows in self._forward(input_ids, keys, flat_rows, store_dtype).items()}

    def bare_forward(self, input_ids: np.ndarray) -> None:
        bare_forward(self.loaded, torch.from_numpy(input_ids.astype(np.int64)))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of a captured tensor; bfloat16 becomes ml_dtypes.bfloat16, bit for bit."""
    tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES["bfloat16"])
    return tensor.numpy()
