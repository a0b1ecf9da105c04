"""The torch backend as the harvest sees it: transformers' model with capture hooks.

Positions are gathered and cast to the store dtype on the model's device, inside the
hooks, so full-size activations never reach the host.
"""

from __future__ import annotations

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

    def launch(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
               store_dtype: str) -> dict[Key, KeptRows]:
        """Runs the forward to the end (the hooks gather `flat_rows` on the device)."""
        capture = self._captures.get(keys) or self._captures.setdefault(keys, ActivationCapture(self.loaded, keys))
        flat = torch.from_numpy(flat_rows).to(self.loaded.device)
        dtype = TORCH_STORE_DTYPES[store_dtype]

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1, t.shape[-1]).index_select(0, flat).to(dtype)

        captured = capture(torch.from_numpy(input_ids.astype(np.int64)), transform=gather)
        return {key: KeptRows(_to_numpy(tensor)) for key, tensor in captured.items()}

    def collect(self, pending: dict[Key, KeptRows]) -> dict[Key, KeptRows]:
        return pending

    def capture(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
                store_dtype: str) -> dict[Key, np.ndarray]:
        return {key: rows.gathered() for key, rows in self.launch(input_ids, keys, flat_rows, store_dtype).items()}

    def bare_forward(self, input_ids: np.ndarray) -> None:
        bare_forward(self.loaded, torch.from_numpy(input_ids.astype(np.int64)))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of a captured tensor; bfloat16 becomes ml_dtypes.bfloat16, bit for bit."""
    tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES["bfloat16"])
    return tensor.numpy()
