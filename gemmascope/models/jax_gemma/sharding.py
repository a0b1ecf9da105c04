"""Placing the model on the devices of one host: data parallel over the batch, tensor
parallel over attention heads and MLP features when the weights do not fit one device.

The mesh has axes ("data", "model"). Projections into heads or MLP features are split
on their output rows, projections out of them on their input columns (the Megatron
pattern: one all-reduce after attention, one after the MLP); norms and the embedding
are replicated. Tensor parallelism must divide the key/value heads, so that each
device owns whole query groups.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemmascope.errors import UserError
from gemmascope.models.jax_gemma.architecture import GemmaArchitecture

# Share of one device's memory the weights may take; the rest holds activations.
WEIGHT_MEMORY_SHARE = 0.5
_ROW_SPLIT = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_COLUMN_SPLIT = {"o_proj", "down_proj"}


def device_memory_bytes(device: Any) -> int | None:
    """The device's memory limit, or None where JAX does not report one (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics raise instead of returning None
        return None
    return (stats or {}).get("bytes_limit")


def choose_tensor_parallel(arch: GemmaArchitecture, n_devices: int, expected: Any,
                           memory_bytes: int | None) -> int:
    """The smallest degree (a divisor of the devices and KV heads) at which one device's
    share of the weights (split ones divided, replicated ones whole) fits in
    WEIGHT_MEMORY_SHARE of its memory; 1 where the memory is unknown (CPU)."""
    degrees = [d for d in range(1, n_devices + 1) if n_devices % d == 0 and arch.n_kv_heads % d == 0]
    if memory_bytes is None:
        return 1
    for degree in degrees:
        if per_device_bytes(expected, degree) <= WEIGHT_MEMORY_SHARE * memory_bytes:
            return degree
    return degrees[-1]


def make_mesh(devices: list[Any], tensor_parallel: int, arch: GemmaArchitecture) -> Mesh:
    if len(devices) % tensor_parallel or arch.n_kv_heads % tensor_parallel:
        raise UserError(f"model.tensor_parallel={tensor_parallel} must divide the {len(devices)} devices "
                        f"and the {arch.n_kv_heads} key/value heads")
    grid = np.array(devices).reshape(len(devices) // tensor_parallel, tensor_parallel)
    return Mesh(grid, ("data", "model"))


def param_spec(path: tuple[str, ...]) -> PartitionSpec:
    """Where one parameter lives, from its module name."""
    module = path[-2] if len(path) >= 2 else ""
    if module in _ROW_SPLIT:
        return PartitionSpec("model", None)
    if module in _COLUMN_SPLIT:
        return PartitionSpec(None, "model")
    return PartitionSpec()


def per_device_bytes(expected: Any, degree: int) -> int:
    """Bytes of weights one device holds at tensor-parallel `degree`."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        names = tuple(getattr(entry, "key", str(entry)) for entry in path)
        split = degree if param_spec(names) != PartitionSpec() else 1
        total += math.prod(leaf.shape) * leaf.dtype.itemsize // split
    return total


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token ids `[batch, time]` split over "data"."""
    return NamedSharding(mesh, PartitionSpec("data", None))
