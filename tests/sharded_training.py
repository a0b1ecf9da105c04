"""Run with 8 forced CPU devices (a subprocess of test_sharding.py): train one job under
several meshes and print, as JSON, the final parameters' differences to the single-device
run and the shardings the state actually has; then a (skip) transcoder job under a data x
latent mesh against one device."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemmascope.store.synthetic import write_store  # noqa: E402
from gemmascope.train.group import Group, initial_state, sharded_layout  # noqa: E402
from gemmascope.train.mesh import make_mesh  # noqa: E402
from gemmascope.train.trainer import train_job  # noqa: E402
from tests.test_train_transcoders import transcoder_config, transcoder_data  # noqa: E402
from tests.train_helpers import gaussian_store, load_params, small_config  # noqa: E402

MESHES = {"single": (1, 1), "data8": (8, 1), "data2_latent4": (2, 4), "latent8": (1, 8)}


def main(root: str) -> None:
    results = {"devices": len(jax.devices()), "runs": {}, "specs": {}}
    finals = {}
    for name, (data, latent) in MESHES.items():
        run_dir = os.path.join(root, name)
        gaussian_store(run_dir, n_rows=8192, d_in=32, seed=1)
        config = small_config(run_dir, widths=(64, 128), sparsity=(0.01, 0.05), steps=40, batch=512,
                              mesh_data=data, mesh_latent=latent, log_every=20, shuffle_rows=4096)
        train_job(config, "res-L0-w64+128", progress=False)
        finals[name] = {sae: load_params(run_dir, sae, "res-L0-w64+128") for sae in
                        ("w64-s0.01", "w64-s0.05", "w128-s0.01", "w128-s0.05")}
        # The shardings a fresh state gets under this mesh.
        cfg = config.train
        group = Group.of(32, [(64, 0.01), (64, 0.05), (128, 0.01), (128, 0.05)])
        _, shardings = sharded_layout(group, cfg, make_mesh(cfg))
        state = initial_state(group, cfg, shardings)
        nu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "W_enc"))
        nu_params = [leaf for leaf in nu if hasattr(leaf, "W_enc") and hasattr(leaf.W_enc, "sharding")]
        results["specs"][name] = {
            "mesh": dict(make_mesh(cfg).shape),
            "W_enc": str(state.params[0].W_enc.sharding.spec),
            "W_dec": str(state.params[0].W_dec.sharding.spec),
            "b_enc": str(state.params[0].b_enc.sharding.spec),
            "b_dec": str(state.params[0].b_dec.sharding.spec),
            "log_threshold": str(state.params[0].log_threshold.sharding.spec),
            "nu_W_enc": sorted({str(p.W_enc.sharding.spec) for p in nu_params}),
            "nu_W_dec": sorted({str(p.W_dec.sharding.spec) for p in nu_params}),
            "W_enc_shard_shape": list(state.params[0].W_enc.addressable_shards[0].data.shape),
        }
    for name in MESHES:
        worst, flipped, worst_flip = 0.0, 0, 0.0
        for sae, params in finals[name].items():
            for key, value in params.items():
                reference = finals["single"][sae][key]
                relative = np.abs(value - reference) / max(float(np.abs(reference).max()), 1e-12)
                if key == "threshold":  # a pre-activation on the band's edge may round either way
                    flipped += int(np.sum(relative > 2e-4))
                    worst_flip = max(worst_flip, float(relative.max()))
                else:
                    worst = max(worst, float(relative.max()))
        results["runs"][name] = {"max_relative_difference": worst, "thresholds_apart": flipped,
                                 "max_threshold_difference": worst_flip}
    results["transcoders"] = transcoder_meshes(root)
    print(json.dumps(results))


def transcoder_meshes(root: str) -> dict:
    """A transcoder and a skip transcoder trained on (1, 1) and (2, 4): the largest relative
    difference of their parameters, and W_skip's sharding (replicated: it has no latent axis)."""
    x, y, _, _ = transcoder_data(n_rows=8192)
    finals, job = {}, "mlp_in-L0-to-mlp-w128"
    for data, latent in ((1, 1), (2, 4)):
        run_dir = os.path.join(root, f"transcoders-{data}x{latent}")
        write_store(run_dir, {("mlp_in", 0): x, ("mlp", 0): y})
        config = transcoder_config(run_dir, steps=40, mesh_data=data, mesh_latent=latent, holdout_rows=1024,
                                   batch_size=512, tokens=40 * 512, shuffle_rows=4096)
        train_job(config, job, progress=False)
        finals[latent] = {sae: load_params(run_dir, sae, job) for sae in ("w128-s0.001", "w128-s0.001-skip")}
    worst = max(float(np.abs(finals[4][sae][key] - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
                for sae, params in finals[1].items() for key, ref in params.items())
    group = Group.of(32, [(128, 0.001)], ["jumprelu"], 32, [True])
    _, shardings = sharded_layout(group, config.train, make_mesh(config.train))
    return {"max_relative_difference": worst, "W_skip": str(shardings.params[0].W_skip.spec),
            "W_dec": str(shardings.params[0].W_dec.spec), "keys": sorted(finals[4]["w128-s0.001-skip"])}


if __name__ == "__main__":
    main(sys.argv[1])
