"""`gemmascope bench harvest --backend jax` on the tiny model: both backends measured on
the same tokens, each writing the same rows, and the summary showing them side by side."""

from __future__ import annotations

import json

from gemmascope.bench.harvest import measure
from gemmascope.bench.summary import summarise
from gemmascope.cli import build_parser

PER_BACKEND = ("tokens_per_s", "bare_forward_tokens_per_s", "overhead", "bare_seconds", "harvest_seconds",
               "bare_cpu_seconds", "harvest_cpu_seconds", "first_call_seconds", "stored_rows", "computed_positions", "device", "dtype")


def test_bench_harvest_measures_both_backends(tmp_path):
    args = build_parser().parse_args(
        ["bench", "harvest", "--model", "tiny-gemma2", "--tokens", "1024", "--repeats", "1",
         "--context-length", "64", "--backend", "jax", "--out", str(tmp_path), "--json"])
    result = measure(args)

    assert result["backend"] == "jax"
    assert set(result["backends"]) == {"torch", "jax"}
    for name, figures in result["backends"].items():
        assert all(key in figures for key in PER_BACKEND), (name, sorted(figures))
        assert figures["tokens_per_s"] > 0 and figures["bare_forward_tokens_per_s"] > 0
        assert len(figures["bare_seconds"]) == len(figures["harvest_seconds"]) == 1
        assert figures["first_call_seconds"]["bare"] > 0 and figures["first_call_seconds"]["harvest"] > 0
        assert figures["computed_positions"] >= result["positions"]
    assert "threads" in result["backends"]["torch"]
    assert {"device_kind", "devices"} <= set(result["backends"]["jax"])
    # The headline figures are the chosen backend's.
    assert result["tokens_per_s"] == result["backends"]["jax"]["tokens_per_s"]
    assert result["bare_forward_tokens_per_s"] == result["backends"]["jax"]["bare_forward_tokens_per_s"]
    assert result["jax_over_torch_harvest"] > 0 and result["jax_over_torch_bare"] > 0
    # Both backends stored every row of the unit, and the same activations (bf16 store).
    assert result["backends"]["torch"]["stored_rows"] == result["backends"]["jax"]["stored_rows"] == result["rows"]
    assert result["rows"] >= 1024
    assert result["backends_agree"]["max_abs_diff_over_max_abs"] < 2e-2
    # The store-only run (the jax harvest's rows replayed, no forward) ran once per
    # repetition; the benchmark checks it wrote the same bytes.
    assert len(result["store_only_seconds"]) == len(result["store_only_cpu_seconds"]) == 1
    assert result["store_only_seconds"][0] > 0 and result["store_only_cpu_seconds"][0] > 0

    (tmp_path / "harvest.json").write_text(json.dumps(result))
    table = summarise(tmp_path)
    assert "jax on cpu" in table and "torch on cpu" in table and "jax against torch" in table
    assert "jax: where the overhead goes" in table
