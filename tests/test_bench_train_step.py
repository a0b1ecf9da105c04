"""`gemmascope bench train-step` on a tiny shape: the contract's figures, consistent with
each other, and the rounds it alternates over."""

from __future__ import annotations

import pytest

from gemmascope.bench.summary import _train_rows
from gemmascope.bench.train_step import measure
from gemmascope.cli import build_parser


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


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        parse("--rounds", "0")
