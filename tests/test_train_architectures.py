"""SAE architectures beyond JumpReLU through config -> plan -> train -> export.

The math of each rule is tested against numpy references in test_architectures.py; here
the same rules run inside the grouped trainer, its checkpoints and its exports.
"""

from __future__ import annotations

import pytest

from gemmascope.config import load_config
from gemmascope.errors import ConfigError
from gemmascope.models.loading import ModelInfo
from gemmascope.sweep.grid import plan_jobs

INFO = ModelInfo("test", "gemma2", 4, 64, 4, 16, 1000)


def _plan(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return plan_jobs(load_config(path), INFO)


def test_every_architecture_is_named_by_its_own_knob_and_shares_the_streams_job(tmp_path):
    jobs = _plan(tmp_path, """
saes:
  - {sites: [res], layers: [1], widths: [1024], sparsity: [1.0e-3]}
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [small, 45, big]}
  - {sites: [res], layers: [1], widths: [1024], architecture: topk, k: [32]}
  - {sites: [res], layers: [1], widths: [1024], architecture: batchtopk, k: [32]}
  - {sites: [res], layers: [1], widths: [1024], architecture: matryoshka_batchtopk, k: [16]}
  - {sites: [res], layers: [1], widths: [1024], architecture: relu_l1, sparsity: [0.01]}
""")
    (job,) = jobs
    assert job.id == "res-L1-w1k"  # the batch is read once for every architecture of the stream
    assert [s.name for s in job.saes] == ["w1024-s0.001", "w1024-l0_15", "w1024-l0_45", "w1024-l0_120",
                                          "w1024-k32", "w1024-btk32", "w1024-mbtk16", "w1024-l1_0.01"]
    assert [s.architecture for s in job.saes][:2] == ["jumprelu", "jumprelu_target_l0"]


def test_a_label_and_its_number_are_the_same_sae(tmp_path):
    with pytest.raises(ConfigError, match=r"SAE w1024-l0_45 is already in saes\[0\]"):
        _plan(tmp_path, """
saes:
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [medium]}
  - {sites: [res], layers: [1], widths: [1024], architecture: jumprelu_target_l0, l0_targets: [45]}
""")


@pytest.mark.parametrize(("entry", "message"), [
    ("{architecture: topk}", r"saes\[0\].k=None: architecture topk needs k values"),
    ("{architecture: topk, k: [8], sparsity: [0.001]}", r"saes\[0\].sparsity=\[0.001\]: not a knob of "
                                                         r"architecture topk \(it takes k\)"),
    ("{k: [8]}", r"saes\[0\].k=\[8\]: not a knob of architecture jumprelu \(it takes sparsity\)"),
    ("{architecture: relu_l1}", r"saes\[0\].sparsity=None: architecture relu_l1 needs sparsity values"),
    ("{architecture: jumprelu_target_l0, l0_targets: [huge]}",
     r"saes\[0\].l0_targets=\['huge'\]: expected list of int \| 'small' \| 'medium' \| 'big'"),
    ("{architecture: jumprelu_target_l0, l0_targets: [0]}", r"saes\[0\].l0_targets\[0\]=0: must be >= 1"),
    ("{architecture: batchtopk, widths: [64], k: [65]}", r"saes\[0\].k\[0\]=65: more than the width 64"),
    ("{architecture: matryoshka_batchtopk, widths: [4], k: [2]}", r"saes\[0\].widths=\[4\]: matryoshka"),
    ("{architecture: topk, k: [8], init_from: /x}", r"saes\[0\].init_from='/x': a released JumpReLU SAE"),
    ("{architecture: sparse_magic}", r"saes\[0\].architecture='sparse_magic': expected 'jumprelu'"),
])
def test_missing_foreign_or_bad_knobs_are_one_line_errors_naming_the_key(tmp_path, entry, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"saes:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)
