"""`plan` estimates the harvest's write rate per node and warns when it exceeds storage.node_write_bandwidth_mib_s."""

from __future__ import annotations

import json

import pytest

from gemmascope.config import Config, HarvestConfig, SAEGridEntry, StorageConfig, SweepConfig
from gemmascope.errors import InvalidValue
from gemmascope.models.loading import ModelInfo
from gemmascope.sweep.plan import format_plan, plan
from tests.harvest_helpers import ROOT, cli

INFO = ModelInfo("test", "gemma2", n_layers=4, d_model=256, n_heads=4, head_dim=64, vocab_size=1000,
                 d_ff=1024, n_kv_heads=4)


def config(workers_per_node: int, *, dtype: str = "bfloat16", budget: float | None = 1000.0) -> Config:
    return Config(
        harvest=HarvestConfig(sites=("res", "mlp"), layers=(0, 2), store_dtype=dtype,
                              workers_per_node=workers_per_node),
        saes=(SAEGridEntry(sites=("res",), layers=(2,), widths=(1024,)),),
        sweep=SweepConfig(device_flops=2e12, utilisation=0.25),
        storage=StorageConfig(node_write_bandwidth_mib_s=budget),
    )


def hand_rate(workers_per_node: int, value_bytes: int = 2) -> float:
    # Layers 0..2 are run (3 layers); per layer: attention 4 * 256 * (4 * 64) weights and a
    # gated MLP of width 1024, 3 * 256 * 1024 weights; 2 FLOPs per weight.
    flops_per_token = 2 * 3 * (4 * 256 * 256 + 3 * 256 * 1024)  # 6,291,456
    tokens_per_s = 2e12 * 0.25 / flops_per_token  # one worker: ~79,473 tokens/s
    row_bytes = 4 * 256 * value_bytes  # res and mlp at layers 0 and 2
    return tokens_per_s * row_bytes * workers_per_node / 2**20


def test_the_rate_is_the_hand_computation():
    result = plan(config(3), INFO)
    assert result["harvest_forward_flops_per_token"] == 6_291_456
    assert result["harvest_write_mib_s_per_node"] == pytest.approx(hand_rate(3), rel=1e-12)
    assert result["harvest_workers_per_node"] == 3
    assert result["node_write_bandwidth_mib_s"] == 1000.0


def test_grouped_query_attention_and_the_mlp_width_come_from_the_model():
    """Gemma 2 2B written out from its config: per layer q and o 2304 x 8 x 256, k and v
    2304 x 4 x 256, MLP 3 x 2304 x 9216; 2 FLOPs per weight, layers 0..12."""
    from gemmascope.config import ModelConfig
    from gemmascope.models.loading import model_info
    from gemmascope.sweep.plan import forward_flops_per_token

    info = model_info(ModelConfig(source="google/gemma-2-2b"))
    assert (info.d_ff, info.n_kv_heads) == (9216, 4)
    per_layer = 2 * 2304 * 8 * 256 + 2 * 2304 * 4 * 256 + 3 * 2304 * 9216
    assert forward_flops_per_token(info, 12) == 2 * 13 * per_layer
    # A store recorded without them: the upper bound (kv heads = heads, d_ff = 4 d_model).
    old = ModelInfo("old", "gemma2", 26, 2304, 8, 256, 256000)
    assert forward_flops_per_token(old, 12) == 2 * 13 * (4 * 2304 * 8 * 256 + 12 * 2304 * 2304)


def test_a_rate_over_the_budget_warns_naming_both_numbers_and_remedies():
    rate = hand_rate(8, value_bytes=4)  # ~4,850 MiB/s
    assert rate > 1000
    result = plan(config(8, dtype="float32"), INFO)
    assert len(result["warnings"]) == 1
    warning = result["warnings"][0]
    assert f"{rate:,.0f} MiB/s" in warning and "node_write_bandwidth_mib_s=1000" in warning
    for remedy in ("harvest.sites", "harvest.workers_per_node", "bfloat16"):
        assert remedy in warning
    assert f"warning: {warning}" in format_plan(result).splitlines()
    json.dumps(result)  # still one JSON-able object


def test_a_rate_under_the_budget_does_not_warn():
    assert hand_rate(3) < 1000
    result = plan(config(3), INFO)
    assert result["warnings"] == []
    assert "warning" not in format_plan(result)
    assert "MiB/s per node" in format_plan(result)


def test_no_budget_no_check():
    assert plan(config(64, budget=None), INFO)["warnings"] == []


def test_bad_budget_is_rejected():
    with pytest.raises(InvalidValue) as info:
        StorageConfig(node_write_bandwidth_mib_s=0)
    assert info.value.key == "node_write_bandwidth_mib_s"
    with pytest.raises(InvalidValue) as info:
        HarvestConfig(workers_per_node=0)
    assert info.value.key == "workers_per_node"


def test_plan_json_on_the_command_line_carries_rate_and_warnings():
    result = cli("plan", str(ROOT / "configs" / "families" / "gemma2-2b-pt-res.yaml"),
                 "storage.node_write_bandwidth_mib_s=50", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["harvest_write_mib_s_per_node"] > 50
    assert data["warnings"] and "node_write_bandwidth_mib_s=50" in data["warnings"][0]
