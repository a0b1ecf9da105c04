"""With 8 forced CPU devices: data-parallel and latent-sharded training equal single-device
training, and parameters and optimiser state live where the mesh config says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_meshes_agree_and_shard_as_configured(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "tests.sharded_training", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for name, run in report["runs"].items():
        assert run["max_relative_difference"] < 2e-4, (name, run)
        # The straight-through band is a step function: where a pre-activation sits on its
        # edge, a different summation order can move one latent's threshold by a step
        # (one latent in 384 here); no more than that, and by no more than a few percent.
        assert run["thresholds_apart"] <= 2 and run["max_threshold_difference"] < 0.03, (name, run)
    specs = report["specs"]
    assert specs["data8"]["mesh"] == {"data": 8, "latent": 1}
    assert specs["data2_latent4"]["mesh"] == {"data": 2, "latent": 4}
    for name in ("data2_latent4", "latent8"):
        s = specs[name]
        assert s["W_enc"] == "P(None, 'latent')"
        assert s["W_dec"] == "P('latent', None)"
        assert s["b_enc"] == s["log_threshold"] == "P('latent',)"
        assert s["b_dec"] == "P(None,)"
        assert s["nu_W_enc"] == ["P(None, 'latent')"]
        assert s["nu_W_dec"] == ["P('latent', None)"]
    latent = int(specs["data2_latent4"]["mesh"]["latent"])
    assert specs["data2_latent4"]["W_enc_shard_shape"] == [32, 64 // latent]
    assert specs["data8"]["W_enc_shard_shape"] == [32, 64]  # replicated when latent = 1
    transcoders = report["transcoders"]
    assert transcoders["max_relative_difference"] < 2e-4, transcoders
    assert transcoders["W_dec"] == "P('latent', None)" and transcoders["W_skip"] == "P()"
    assert "W_skip" in transcoders["keys"]
