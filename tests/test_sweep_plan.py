"""Planning: the nine family configs reproduce SPEC.md section 4, jobs fit their devices, bad grids fail clearly."""

from __future__ import annotations

import json

import pytest

from gemmascope.config import load_config
from gemmascope.errors import ConfigError
from gemmascope.models.loading import ModelInfo, model_info
from gemmascope.sweep.grid import plan_jobs, width_label
from gemmascope.sweep.plan import plan
from tests.harvest_helpers import ROOT, cli

FAMILIES = ROOT / "configs" / "families"
B = 10**9

# SPEC.md section 4, written out by hand: {family: [(site, layers, widths, tokens)]}.
ALL_2B, ALL_9B = range(26), range(42)
TABLE = {
    "gemma2-2b-pt-res": [("embed", [0], [2**12], 4 * B), ("res", ALL_2B, [2**14], 4 * B),
                         ("res", [12], [2**15], 8 * B), ("res", ALL_2B, [2**16], 8 * B),
                         ("res", [12], [2**17, 2**18, 2**19], 8 * B), ("res", [5, 12, 19], [2**20], 16 * B)],
    "gemma2-2b-pt-mlp": [("mlp", ALL_2B, [2**14], 4 * B), ("mlp", ALL_2B, [2**16], 8 * B)],
    "gemma2-2b-pt-att": [("att", ALL_2B, [2**14], 4 * B), ("att", ALL_2B, [2**16], 8 * B)],
    "gemma2-9b-pt-res": [("res", ALL_9B, [2**14], 4 * B), ("res", [20], [2**15, 2**16], 8 * B),
                         ("res", ALL_9B, [2**17], 8 * B), ("res", [20], [2**18, 2**19], 8 * B),
                         ("res", [9, 20, 31], [2**20], 16 * B)],
    "gemma2-9b-pt-mlp": [("mlp", ALL_9B, [2**14], 4 * B), ("mlp", ALL_9B, [2**17], 8 * B)],
    "gemma2-9b-pt-att": [("att", ALL_9B, [2**14], 4 * B), ("att", ALL_9B, [2**17], 8 * B)],
    "gemma2-27b-pt-res": [("res", [10, 22, 34], [2**17], 8 * B)],
    "gemma2-9b-it-res": [("res", [9, 20, 31], [2**14], 4 * B), ("res", [9, 20, 31], [2**17], 8 * B)],
    "gemma2-2b-pt-transcoders": [("mlp_in", ALL_2B, [2**14], 4 * B)],
}
TARGETS = {"gemma2-2b-pt-transcoders": "mlp"}


def expected(family: str) -> set[tuple]:
    return {(site, layer, width, tokens, TARGETS.get(family, site))
            for site, layers, widths, tokens in TABLE[family] for layer in layers for width in widths}


def test_there_are_exactly_nine_family_configs():
    assert sorted(p.stem for p in FAMILIES.glob("*.yaml")) == sorted(TABLE)


@pytest.mark.parametrize("family", sorted(TABLE))
def test_family_config_reproduces_the_release_grid(family):
    config = load_config(FAMILIES / f"{family}.yaml")
    result = plan(config, model_info(config.model))
    planned = {(s["site"], s["layer"], s["width"], s["tokens"], s.get("target", s["site"])) for s in result["saes"]}
    assert planned == expected(family)
    per_stream: dict[tuple, set[float]] = {}
    for s in result["saes"]:
        per_stream.setdefault((s["site"], s["layer"], s["width"]), set()).add(s["sparsity"])
    assert min(len(v) for v in per_stream.values()) >= 5
    assert all(6e-4 in v for v in per_stream.values())  # the known point lambda -> L0 ~ 50
    # Every SAE is in exactly one job, and every job fits its devices.
    in_jobs = [name for job in result["jobs"] for name in job["saes"]]
    assert len(in_jobs) == len(result["saes"])
    for job in result["jobs"]:
        resources = job["resources"]
        assert resources["device_bytes"] <= 80 * 2**30 * 0.8
        assert resources["mesh_data"] * resources["mesh_latent"] == resources["devices"] == 8
    json.dumps(result)  # the --json output is plain JSON


def test_family_totals_match_the_reports_storage_figure():
    """SPEC.md section 7: ~17 PiB for all sites and layers of 2B + 9B (raw float32)."""
    total = 0
    for family in ("gemma2-2b-pt-res", "gemma2-2b-pt-mlp", "gemma2-2b-pt-att",
                   "gemma2-9b-pt-res", "gemma2-9b-pt-mlp", "gemma2-9b-pt-att"):
        config = load_config(FAMILIES / f"{family}.yaml")
        total += plan(config, model_info(config.model))["storage_bytes"]
    # By hand: 8e9 rows x 4 bytes x (26 x (2304 + 2304 + 2048) + 2304 + 42 x (3584 + 3584 + 4096)).
    assert total == 8 * B * 4 * (26 * (2304 + 2304 + 2048) + 2304 + 42 * (3584 + 3584 + 4096))
    assert 15 * 2**50 < total < 20 * 2**50
    # One site and layer of 9B at 8B tokens: ~100 TiB.
    assert 95 * 2**40 < 8 * B * 4 * 3584 < 110 * 2**40


def _info(n_layers=4, d_model=64) -> ModelInfo:
    return ModelInfo("test", "gemma2", n_layers, d_model, 4, 16, 1000)


def _config(tmp_path, text: str, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, list(overrides))


def test_saes_of_one_stream_share_a_job_until_memory_runs_out(tmp_path):
    text = """
saes:
  - {sites: [res], layers: [1], widths: [1024, 4096], sparsity: [1.0e-4, 1.0e-3, 1.0e-2], tokens: 1000000}
  - {sites: [res], layers: [2], widths: [1024], sparsity: [1.0e-3], tokens: 2000000}
  - {sites: [res], layers: [2], widths: [2048], sparsity: [1.0e-3], tokens: 1000000}
train: {batch_size: 1000}
sweep: {device_memory_gib: 1.0, memory_fraction: 1.0}
"""
    jobs = {job.id: job for job in plan_jobs(_config(tmp_path, text), _info(d_model=2048))}
    # By hand, per SAE: 16 bytes per parameter (value, second moment, gradient, update) plus
    # six [batch, width] and four [batch, d_in] float32 buffers. Width 1024: 67.2 MB + 57.3 MB;
    # width 4096: 268.6 MB + 131.1 MB. Three 1024s and one 4096 take 773 MB of the 1,074 MB;
    # a second 4096 would make 1,173 MB, so it starts the next job.
    assert sorted(jobs) == ["res-L1-w1k+4k", "res-L1-w4k", "res-L2-w1k", "res-L2-w2k"]
    assert [s.name for s in jobs["res-L1-w1k+4k"].saes] == [
        "w1024-s0.0001", "w1024-s0.001", "w1024-s0.01", "w4096-s0.0001"]
    assert [s.name for s in jobs["res-L1-w4k"].saes] == ["w4096-s0.001", "w4096-s0.01"]
    # Different token budgets are different streams, even on one layer.
    assert jobs["res-L2-w1k"].tokens == 2000000 and jobs["res-L2-w2k"].tokens == 1000000
    assert jobs["res-L2-w1k"].steps(1000) == 2000


def test_wide_saes_get_latent_sharding_and_too_wide_ones_are_refused(tmp_path):
    text = """
saes:
  - {sites: [res], layers: [0], widths: [1048576], sparsity: [1.0e-3]}
  - {sites: [res], layers: [0], widths: [16384], sparsity: [1.0e-3], tokens: 8192}
train: {batch_size: 4096}
sweep: {accelerator: gpu, devices_per_job: 8, device_memory_gib: 80}
"""
    jobs = {job.id: job for job in plan_jobs(_config(tmp_path, text), _info(d_model=2304))}
    wide, narrow = jobs["res-L0-w1m"].resources, jobs["res-L0-w16k"].resources
    assert (narrow.mesh_data, narrow.mesh_latent) == (8, 1)
    assert wide.mesh_latent > 1 and wide.mesh_data * wide.mesh_latent == 8
    assert wide.ray_options() == {"num_cpus": 1, "memory": wide.host_bytes, "num_gpus": 8}
    with pytest.raises(ConfigError, match=r"width 1048576 does not fit 1 host\(s\) x 1 x 16 GiB"):
        plan_jobs(_config(tmp_path, text, "sweep.devices_per_job=1", "sweep.device_memory_gib=16"),
                  _info(d_model=2304))


def test_saes_too_wide_for_one_host_span_hosts_and_narrow_ones_stay_on_one(tmp_path):
    """A 1M-wide SAE does not fit one 8 x 16 GiB host: with max_hosts_per_job 4 it gets the fewest
    hosts that hold it, its latent axis over all their devices; narrow SAEs of the same stream
    are not packed into its job (they would ride on hosts they do not need)."""
    text = """
saes:
  - {sites: [res], layers: [0], widths: [16384, 1048576], sparsity: [1.0e-3]}
train: {batch_size: 4096}
sweep: {accelerator: tpu, devices_per_job: 8, device_memory_gib: 16, max_hosts_per_job: 4}
"""
    config = _config(tmp_path, text)
    jobs = {job.id: job for job in plan_jobs(config, _info(d_model=2304))}
    assert sorted(jobs) == ["res-L0-w16k", "res-L0-w1m"]
    wide, narrow = jobs["res-L0-w1m"].resources, jobs["res-L0-w16k"].resources
    assert narrow.hosts == 1
    # Written out: 4 bytes x 4 copies (params, grads, two Adam moments) of the state plus six
    # float32 [batch, width] buffers, spread over every device: 8 do not hold it, 16 do.
    need = 4 * 4 * (2 * 2304 * 1048576 + 2 * 1048576 + 2304) + 4 * 6 * 4096 * 1048576
    assert need / 16 < 16 * 2**30 * 0.8 < need / 8
    assert wide.hosts == 2 and wide.mesh_data * wide.mesh_latent == 16 and wide.mesh_latent >= 8
    assert wide.device_bytes <= 16 * 2**30 * 0.8
    assert wide.ray_options() == {"num_cpus": 1, "memory": wide.host_bytes, "resources": {"TPU": 8}}
    with pytest.raises(ConfigError, match=r"does not fit 1 host\(s\) x 8 x 16 GiB"):
        plan_jobs(_config(tmp_path, text, "sweep.max_hosts_per_job=1"), _info(d_model=2304))


@pytest.mark.parametrize(("text", "message"), [
    ("saes:\n  - {sites: [res], layers: [9]}\n", r"saes\[0\].layers: layer 9 out of range"),
    ("saes:\n  - {sites: [res], layers: [1]}\n  - {sites: [res], layers: [1]}\n", r"already in saes\[0\]"),
    ("harvest: {sites: [res]}\nsaes:\n  - {sites: [mlp], layers: [1]}\n", "mlp layer 1 is not harvested"),
    ("saes:\n  - {sites: [embed], layers: [2]}\n", "exist at none of the layers"),
])
def test_bad_grids_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as info:
        plan_jobs(_config(tmp_path, text), _info())
    assert "\n" not in str(info.value)


def test_width_labels_follow_the_release_folders():
    assert [width_label(2**k) for k in range(14, 21)] == ["16k", "32k", "65k", "131k", "262k", "524k", "1m"]
    assert width_label(4096) == "4k" and width_label(128) == "128"


def test_plan_command_prints_a_table_and_json():
    table = cli("plan", str(FAMILIES / "gemma2-9b-pt-res.yaml"))
    assert table.returncode == 0, table.stderr
    assert "res-L20-w1m" in table.stdout and "PiB" in table.stdout and "device-hours" in table.stdout
    result = json.loads(cli("plan", str(FAMILIES / "gemma2-9b-pt-res.yaml"), "--json").stdout)
    assert set(result) >= {"saes", "jobs", "storage_bytes", "training_flops", "device_hours"}
    assert result["sae_count"] == len(result["saes"]) == 6 * (42 + 2 + 42 + 2 + 3)
    bad = cli("plan", str(FAMILIES / "gemma2-9b-pt-res.yaml"), "saes=[{sites: [res], widths: [3000]}]")
    assert bad.returncode == 2 and "saes[0].widths[0]=3000" in bad.stderr and "power of two" in bad.stderr
