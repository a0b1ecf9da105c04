"""The device mesh ("data", "latent") and where each training array lives on it.

Batches are split over "data"; encoder columns, decoder rows, encoder bias and
thresholds (and their optimiser state) over "latent", so a wide SAE's parameters are
spread across devices. Axes are Auto so XLA inserts the collectives. In a multi-host
job (`distributed`) the mesh spans every process's devices, in process order, so the
"latent" axis of a mesh wider than one host crosses hosts.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemmascope.config import TrainConfig
from gemmascope.errors import UserError

# Partitioning of each JumpReLU field (and of the per-latent firing counters).
FIELD_SPECS = {
    "W_enc": P(None, "latent"),
    "W_dec": P("latent", None),
    "b_enc": P("latent"),
    "b_dec": P(None),
    "log_threshold": P("latent"),
    "since_fired": P("latent"),
}


def make_mesh(config: TrainConfig) -> Mesh:
    devices = jax.devices()
    latent = config.mesh_latent
    data = config.mesh_data or max(1, len(devices) // latent)
    if data * latent > len(devices):
        raise UserError(f"train.mesh_data={data} x train.mesh_latent={latent} needs {data * latent} devices; "
                        f"JAX sees {len(devices)}")
    return jax.make_mesh((data, latent), ("data", "latent"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * latent])


def _field_name(path) -> str | None:
    for entry in reversed(path):
        name = getattr(entry, "name", None) or getattr(entry, "key", None)
        if isinstance(name, str) and name in FIELD_SPECS:
            return name
    return None


def tree_shardings(mesh: Mesh, tree):
    """A NamedSharding for every leaf: by its JumpReLU field name, replicated otherwise."""
    def sharding(path, leaf):
        name = _field_name(path)
        if name is None or getattr(leaf, "ndim", 0) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, FIELD_SPECS[name])

    return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data", None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device: what every process can read (the step's metrics)."""
    return NamedSharding(mesh, P())


def place_batch(rows, sharding: NamedSharding) -> jax.Array:
    """The global batch array from the full batch `rows`, of which this process fills only
    the shards on its own devices (all of them with one process).

    Every process of a multi-host job runs the same deterministic loader and so reads
    the full batch stream, rather than each reading only its slice of the "data" axis:
    at the widths that need several hosts the step's compute dominates the reading
    (which is the same for any mesh), and identical streams keep the loader position in
    the checkpoint one value for all processes.
    """
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])
