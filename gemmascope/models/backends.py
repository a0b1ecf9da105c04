"""One interface over the two forward implementations the harvest can run.

`model.backend: torch` runs transformers (GPUs and CPUs); `model.backend: jax` runs the
Flax port in `jax_gemma` (TPUs, GPUs, CPUs). Both read the same checkpoint files and
hand back the same sites as numpy arrays in the store dtype; the harvest worker, store
and ledger never know which one ran.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from gemmascope.config import ModelConfig
from gemmascope.models.loading import ModelInfo
from gemmascope.models.sites import Key


class KeptRows(NamedTuple):
    """One site's kept positions of a batch: `positions[index]`, or all of `positions`
    when `index` is None. The gather is left to whoever copies the rows to their
    destination (a writer's shard buffer), so they cross host memory once, not twice."""

    positions: np.ndarray  # [n, width] in the store dtype
    index: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions) if self.index is None else len(self.index)

    def take(self, start: int, out: np.ndarray) -> None:
        """Kept rows [start, start + len(out)) into `out`."""
        if self.index is None:
            out[...] = self.positions[start:start + len(out)]
        else:  # mode="clip" lets numpy gather without a buffered copy; indices are in range
            np.take(self.positions, self.index[start:start + len(out)], axis=0, out=out, mode="clip")

    def gathered(self) -> np.ndarray:
        """All kept rows as one array `[len(self), width]`."""
        return self.positions if self.index is None else self.positions[self.index]


class ForwardBackend(Protocol):
    info: ModelInfo
    tokenizer: Any

    def launch(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
               store_dtype: str) -> Any:
        """Start the forward of token ids `[batch, time]`, keeping the positions
        `flat_rows` (indices into the flattened batch x time); may return before it ends."""
        ...

    def collect(self, pending: Any) -> dict[Key, KeptRows]:
        """`{key: len(flat_rows) rows of width}` in the store dtype, of a launched forward."""
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
