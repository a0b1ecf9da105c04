"""`gemmascope bench train-step` on a tiny shape: the contract's figures, consistent with
each other, and the rounds it alternates over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemmascope.bench.summary import _train_rows, summarise
from gemmascope.bench.train_step import measure
from gemmascope.cli import build_parser
from gemmascope.errors import UserError


def parse(*extra: str):
    return build_parser().parse_args(["bench", "train-step", "--d-in", "16", "--width", "64", "--batch", "32",
                                      "--steps", "1", "--json", *extra])


def test_dense_figures_are_consistent_and_the_group_is_compared_with_singles():
    result = measure(parse("--group", "2", "--rounds", "2"))
    flops = 10.0 * 32 * 16 * 64 * 2
    assert result["tokens_per_s"] == pytest.approx(32 / result["step_seconds"])
    assert result["flops_per_s"] == pytest.approx(flops / result["step_seconds"])
    assert result["fraction_of_matmul"] == pytest.approx(result["flops_per_s"] / result["matmul_flops_per_s"])
    assert result["group_cost_vs_singles"] == pytest.approx(result["step_seconds"] / (2 * result["single_step_seconds"]))
    assert result["ceiling_fraction_of_matmul"] == pytest.approx(
        flops / result["matmul_flops_per_s"] / (result["own_matmuls_seconds"] + result["optimiser_memory_floor_seconds"]))
    rows = _train_rows("x", result)
    assert any(row[0].startswith("group of 2") for row in rows)


def test_the_sparse_comparison_reaches_its_activity():
    result = measure(parse("--l0-fraction", "0.05", "--rounds", "1"))
    assert result["l0_fraction"] == pytest.approx(0.05, abs=0.02)
    assert result["sparse_speedup"] == pytest.approx(result["dense_step_seconds"] / result["sparse_step_seconds"])


@pytest.mark.parametrize(("flag", "architecture"), [("topk", "topk"), ("batchtopk", "batchtopk"),
                                                     ("matryoshka", "matryoshka_batchtopk")])
def test_the_topk_comparisons_time_both_paths(flag, architecture):
    result = measure(parse(f"--{flag}", "4", "--rounds", "1"))
    assert result["architecture"] == architecture and 3 <= result["l0"] <= 4
    assert result["sparse_speedup"] == pytest.approx(result["dense_step_seconds"] / result["sparse_step_seconds"])


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        parse("--rounds", "0")


def test_the_summary_lists_each_layout_comparison(tmp_path):
    comparison = {"what": "batch_major (JumpReLU SAE)", "ours_step_seconds": 2.0, "plain_step_seconds": 2.5,
                  "speedup": 1.25, "ours_temp_bytes": 100 * 2**20, "plain_temp_bytes": 150 * 2**20}
    (tmp_path / "step-layout.json").write_text(json.dumps(
        {"d_in": 16, "width": 64, "batch": 32, "device": "cpu:0", "comparisons": [comparison]}))
    table = summarise(tmp_path)
    assert "| step layout: batch_major (JumpReLU SAE) (16, 64, batch 32) on cpu:0 | 1.25x the plain form's step; " \
           "temporaries 100 vs 150 MiB | documented |" in table


def test_the_layout_benchmark_sees_the_copy_the_ordering_saves():
    """benchmarks/step_layout.py at the demo's SAE shape: six comparisons, and the step
    without `after_every_read` needs more temporary memory (measured 38.6 vs 30.1 MiB at
    batch 256: the W_enc copy; at tiny shapes the [batch, width] buffers set the peak
    either way); `--only batch_sum` times just its two."""
    script = Path(__file__).parents[1] / "benchmarks" / "step_layout.py"
    shape = ["--d-in", "640", "--width", "4096", "--batch", "256", "--steps", "1", "--rounds", "1"]

    def comparisons(*extra: str) -> dict:
        done = subprocess.run([sys.executable, str(script), *shape, *extra], capture_output=True, text=True,
                              check=True)
        return {c["what"]: c for c in json.loads(done.stdout.strip().splitlines()[-1])["comparisons"]}

    by_name = comparisons()
    assert len(by_name) == 6 and all(c["speedup"] > 0 for c in by_name.values())
    assert sorted(comparisons("--only", "batch_sum")) == ["batch_sum (JumpReLU SAE)", "batch_sum (ReLU + L1 SAE)"]
    ordering = by_name["after_every_read (JumpReLU SAE)"]
    assert ordering["plain_temp_bytes"] - ordering["ours_temp_bytes"] >= 640 * 4096 * 4 // 2



def test_the_transcoder_comparison_times_both_paths_and_needs_an_activity(tmp_path):
    result = measure(parse("--l0-fraction", "0.01", "--d-out", "12", "--d-in", "64", "--width", "512", "--batch", "256",
                             "--rounds", "1"))
    assert result["d_out"] == 12 and result["l0_fraction"] == pytest.approx(0.01, abs=0.005)
    assert result["sparse_path_ran"]
    assert result["sparse_speedup"] == pytest.approx(result["dense_step_seconds"] / result["sparse_step_seconds"])
    (tmp_path / "sparse.json").write_text(json.dumps(result))
    assert "| sparse JumpReLU transcoder (to 12) step (64, 512, batch 256) at L0 " in summarise(tmp_path)
    with pytest.raises(UserError, match="--d-out"):
        measure(parse("--d-out", "12"))


def test_the_thunk_profile_accounts_for_the_step_and_shows_the_sparse_kernels():
    """benchmarks/step_thunks.py reads XLA's trace back: the dense step's thunks without a
    host kernel or branch, the sparse step's with its pair selection (a host kernel) and
    the conditional holding both paths, and the last step's timeline made of the
    profiled thunks."""
    script = Path(__file__).parents[1] / "benchmarks" / "step_thunks.py"
    shape = ["--d-in", "64", "--width", "512", "--batch", "128", "--l0-fraction", "0.02"]

    def profile(*extra: str) -> dict:
        done = subprocess.run([sys.executable, str(script), *shape, *extra], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    for extra, sparse in (((), False), (("--sparse",), True)):
        result = profile(*extra)
        names = {t["thunk"] for t in result["thunks"]}
        assert len(names) > 10 and sum(t["ms_per_step"] for t in result["thunks"]) > 0
        assert any(name.startswith("ffi_call") for name in names) == sparse, sorted(names)
        assert any(name.startswith("cond") for name in names) == sparse, sorted(names)
        timeline = result["last_step_timeline"]
        assert timeline and {t["thunk"] for t in timeline} <= names
        assert all(t["start_ms"] >= 0 and t["ms"] >= 0 for t in timeline)


def test_the_target_l0_comparison_times_its_sparse_step(tmp_path):
    result = measure(parse("--l0-fraction", "0.01", "--target-l0", "3", "--d-in", "64", "--width", "512", "--batch", "256",
                             "--rounds", "1"))
    assert result["architecture"] == "jumprelu_target_l0" and result["l0_fraction"] == pytest.approx(0.01, abs=0.005)
    assert result["sparse_path_ran"]
    (tmp_path / "sparse.json").write_text(json.dumps(result))
    assert "| sparse target-L0 JumpReLU step (64, 512, batch 256) at L0 " in summarise(tmp_path)
    with pytest.raises(UserError, match="--target-l0"):
        measure(parse("--target-l0", "3"))
