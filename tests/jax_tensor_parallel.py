"""Run in a subprocess with 8 CPU devices: the JAX backend at tensor-parallel degrees 1,
2 (and data parallel 8, 4) gives the same activations; prints one JSON line."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402

import numpy as np  # noqa: E402

from gemmascope.config import ModelConfig  # noqa: E402
from gemmascope.models.jax_gemma.forward import JaxForward  # noqa: E402


def main() -> None:
    models = {degree: JaxForward(ModelConfig(source="tiny-gemma2", device="cpu", dtype="float32",
                                             backend="jax", tensor_parallel=degree))
              for degree in (1, 2)}
    ids = np.random.default_rng(3).integers(3, 5000, (5, 48))  # 5 rows: padded to the data degree
    ids[:, 0] = 2
    keys = tuple((site, layer) for layer in range(4) for site in ("res", "mlp", "att", "mlp_in"))
    outputs = {degree: model.run(ids, keys, "float32") for degree, model in models.items()}
    error = max(float(np.abs(outputs[2][k] - outputs[1][k]).max() / np.abs(outputs[1][k]).max()) for k in keys)
    split = models[2].params["layers_0"]["self_attn"]["q_proj"]["weight"]
    down = models[2].params["layers_3"]["mlp"]["down_proj"]["weight"]
    print(json.dumps({
        "mesh": {str(d): dict(m.mesh.shape) for d, m in models.items()},
        "max_relative_error": error,
        "q_proj_shard": list(split.addressable_shards[0].data.shape),
        "q_proj_shape": list(split.shape),
        "down_proj_shard": list(down.addressable_shards[0].data.shape),
        "shapes": [list(outputs[2][k].shape) for k in keys[:1]],
    }))


if __name__ == "__main__":
    main()
