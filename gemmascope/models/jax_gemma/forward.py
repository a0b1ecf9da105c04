"""The JAX backend as the harvest sees it: load once, then capture sites batch by batch.

One jitted function per set of requested (site, layer) keys runs the embedding and
layers up to the last requested one and returns those activations already cast to the
store dtype. A batch is padded to a power of two sequences per device, so the short
batches at the ends of units compile a handful of programs, not one per size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gemmascope.config import ModelConfig
from gemmascope.errors import UserError
from gemmascope.models.backends import KeptRows
from gemmascope.models.jax_gemma.architecture import from_hf_config
from gemmascope.models.jax_gemma.model import GemmaModel, expected_params
from gemmascope.models.jax_gemma.sharding import (
    batch_sharding,
    choose_tensor_parallel,
    device_memory_bytes,
    make_mesh,
    param_spec,
)
from gemmascope.models.jax_gemma.weights import load_params
from gemmascope.models.loading import ModelInfo, local_checkpoint_dir, read_info
from gemmascope.models.sites import Key

_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def pick_devices(device: str) -> list[Any]:
    """The devices of this process for `model.device` (auto: JAX's default backend)."""
    if device == "auto":
        return jax.local_devices()
    try:
        return jax.local_devices(backend=_PLATFORMS[device])
    except RuntimeError:
        raise UserError(f"model.device={device!r} but JAX sees no {_PLATFORMS[device]} device "
                        f"(it has: {', '.join(sorted({d.platform for d in jax.devices()}))})") from None


class JaxForward:
    """Gemma 2 / Gemma 3 on this host's JAX devices, built up to `last_layer`
    (None: every layer plus the LM head, for logits)."""

    def __init__(self, config: ModelConfig, last_layer: int | None = None):
        from transformers import AutoConfig, AutoTokenizer

        location = Path(local_checkpoint_dir(config))
        hf_config = AutoConfig.from_pretrained(location)
        self.info: ModelInfo = read_info(config.source, hf_config)
        self.arch = from_hf_config(config.source, hf_config)
        if last_layer is not None and not 0 <= last_layer < self.arch.n_layers:
            raise UserError(f"{config.source}: layer {last_layer} out of range (0..{self.arch.n_layers - 1})")
        self.devices = pick_devices(config.device)
        accelerated = self.devices[0].platform != "cpu"
        dtype_name = config.dtype if config.dtype != "auto" else ("bfloat16" if accelerated else "float32")
        self.dtype = _DTYPES[dtype_name]
        self.full = last_layer is None
        n_layers = self.arch.n_layers if self.full else last_layer + 1
        self.module = GemmaModel(self.arch, n_layers, self.dtype)

        expected = expected_params(self.arch, n_layers, self.dtype)
        degree = config.tensor_parallel or choose_tensor_parallel(
            self.arch, len(self.devices), expected, device_memory_bytes(self.devices[0]))
        self.mesh = make_mesh(self.devices, degree, self.arch)

        def place(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
            return jax.device_put(array, NamedSharding(self.mesh, param_spec(path)))

        self.params = load_params(location, expected, self.dtype, place)
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self._run = jax.jit(self._apply, static_argnums=(2, 3, 4))

    def _apply(self, params: Any, ids: jax.Array, keys: tuple[Key, ...], out_dtype: str, logits: bool):
        return self.module.apply({"params": params}, ids, keys, out_dtype, logits)

    @property
    def data_parallel(self) -> int:
        return self.mesh.shape["data"]

    def padded_rows(self, rows: int) -> int:
        """The batch a forward of `rows` sequences computes: rows per device rounded up
        to a power of two, so a unit's short last batch compiles one of a few programs
        and computes at most twice its rows."""
        per_device = -(-rows // self.data_parallel)
        return (1 << (per_device - 1).bit_length()) * self.data_parallel

    def _place_batch(self, input_ids: np.ndarray) -> jax.Array:
        padded = np.zeros((self.padded_rows(len(input_ids)), input_ids.shape[1]), np.int32)
        padded[: len(input_ids)] = input_ids
        return jax.device_put(padded, batch_sharding(self.mesh))

    def run(self, input_ids: np.ndarray, keys: tuple[Key, ...],
            out_dtype: str) -> dict[Key, np.ndarray]:
        """Every key's activations `[batch, time, width]` as numpy arrays."""
        captured, rows, _ = self.launch(input_ids, keys, np.empty(0, np.int64), out_dtype)
        return {key: np.asarray(value)[:rows] for key, value in captured.items()}

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Next-token logits `[batch, time, vocab]` (float32) of the whole model."""
        if not self.full:
            raise ValueError("logits need the model built with every layer (last_layer=None)")
        _, logits = self._run(self.params, self._place_batch(input_ids), (), "float32", True)
        return np.asarray(logits)[: len(input_ids)]

    def launch(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
               store_dtype: str) -> tuple[dict[Key, jax.Array], int, np.ndarray]:
        """Dispatch the forward (JAX runs it asynchronously) and return at once."""
        captured, _ = self._run(self.params, self._place_batch(input_ids), tuple(sorted(keys)), store_dtype, False)
        return captured, len(input_ids), flat_rows

    def collect(self, pending: tuple[dict[Key, jax.Array], int, np.ndarray]) -> dict[Key, KeptRows]:
        """Wait for a launched forward; each key's positions on the host (a view of
        JAX's buffer, not a copy) with the kept ones' indices."""
        captured, rows, flat_rows = pending
        out = {}
        for key, value in captured.items():
            host = np.asarray(value)[:rows]
            out[key] = KeptRows(host.reshape(-1, host.shape[-1]), flat_rows)
        return out

    def capture(self, input_ids: np.ndarray, keys: tuple[Key, ...], flat_rows: np.ndarray,
                store_dtype: str) -> dict[Key, np.ndarray]:
        """The activations at `keys` of the positions `flat_rows` (indices into batch x time)."""
        kept = self.collect(self.launch(input_ids, keys, flat_rows, store_dtype))
        return {key: rows.gathered() for key, rows in kept.items()}

    def bare_forward(self, input_ids: np.ndarray) -> None:
        """Every built layer, nothing captured but the last output: the harvest's baseline."""
        last = self.module.n_layers - 1
        out = self._run(self.params, self._place_batch(input_ids), (("res", last),), jnp.dtype(self.dtype).name, False)
        jax.block_until_ready(out)
