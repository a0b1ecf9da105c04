"""One interface over the two forward implementations the harvest can run.

`model.backend: torch` runs transformers (GPUs and CPUs); `model.backend: jax` runs the
Flax port in `jax_gemma` (TPUs, GPUs, CPUs). Both read the same checkpoint files and
hand back the same sites as numpy arrays in the store dtype; the harvest worker, store
and ledger never know which one ran.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from gemmascope.config import ModelConfig
from gemmascope.models.loading import ModelInfo
from gemmascope.models.sites import Key


class ForwardBackend(Protocol):
    info: ModelInfo
    tokenizer: Any

    def launch(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
               store_dtype: str) -> Any:
        """Start the forward of token ids `[batch, time]`, keeping the positions
        `flat_rows` (indices into the flattened batch x time); may return before it ends."""
        ...

    def collect(self, pending: Any) -> dict[Key, np.ndarray]:
        """`{key: [len(flat_rows), width]}` in the store dtype, of a launched forward."""
        ...

    def capture(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
                store_dtype: str) -> dict[Key, np.ndarray]:
        """launch + collect."""
        ...

    def bare_forward(self, input_ids: np.ndarray) -> None:
        """The same model on the same ids with nothing captured (the benchmark's baseline)."""
        ...


def open_backend(config: ModelConfig, last_layer: int | None = None) -> ForwardBackend:
    """Load `config`'s model on this process's devices; the jax backend builds layers up to
    `last_layer` only (None: all of them)."""
    if config.backend == "jax":
        from gemmascope.models.jax_gemma.forward import JaxForward

        return JaxForward(config, last_layer)
    from gemmascope.models.torch_forward import TorchForward

    return TorchForward(config)
