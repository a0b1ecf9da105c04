"""`gemmascope bench peers`: a peer that cannot start or step fails with its own one-line
reason, the summary table states each comparison, and, where `make bench-peers` has built
the peers' environment, a real run at a tiny shape gives consistent figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gemmascope.bench import peers
from gemmascope.bench.summary import summarise
from gemmascope.cli import build_parser

PEERS_PYTHON = Path(__file__).parents[1] / ".venv-peers" / "bin" / "python"
REQUIREMENTS = Path(__file__).parents[1] / "benchmarks" / "peers-requirements.txt"


def parse(python: str, *extra: str):
    return build_parser().parse_args(["bench", "peers", "--python", python, "--d-in", "16", "--width", "64",
                                      "--batch", "32", "--k", "4", "--l0-fraction", "0.1", "--steps", "1",
                                      "--rounds", "1", "--json", *extra])


def test_a_missing_python_is_named():
    with pytest.raises(peers.PeerError, match=r"peers' Python '/no/such/python' cannot run.*make bench-peers"):
        peers.measure(parse("/no/such/python"))


def test_a_peer_that_cannot_import_its_library_says_so():
    """This environment has torch but not SAELens: the worker's own error comes back."""
    with pytest.raises(peers.PeerError, match=r"peer saelens-jumprelu exited with status 1: "
                                              r"ModuleNotFoundError: No module named 'sae_lens'"):
        peers.measure(parse(sys.executable))


def test_the_summary_states_each_comparison(tmp_path):
    row = {"ours": "TopK, k 32", "peer": "sparsify-topk", "peer_library": "eai-sparsify 1.3.3", "torch": "2.13.0+cpu",
           "ours_tokens_per_s": 2700.0, "peer_tokens_per_s": 1000.0, "speedup": 2.7}
    (tmp_path / "peers.json").write_text(json.dumps(
        {"d_in": 2304, "width": 16384, "batch": 4096, "dtype": "float32", "devices": ["cpu:0"], "peers": [row]}))
    assert ("| TopK, k 32 (2304, 16384, batch 4096, float32) on cpu:0: ours against sparsify-topk "
            "(eai-sparsify 1.3.3, torch 2.13.0+cpu) | 2,700 vs 1,000 tok/s: 2.70x | > 1x |") in summarise(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="needs the peers' environment (make bench-peers)")
def test_against_the_real_peers_at_a_tiny_shape():
    # A shape whose trained rows fit the sparse capacity (5% of the width) on both of our paths.
    result = peers.measure(parse(str(PEERS_PYTHON), "--d-in", "64", "--width", "1024", "--batch", "256",
                                 "--l0-fraction", "0.01"))
    pinned = dict(line.split("==") for line in REQUIREMENTS.read_text().splitlines() if "==" in line)
    assert [(row["ours"], row["peer"]) for row in result["peers"]] == [
        ("JumpReLU at initialisation", "saelens-jumprelu"), ("JumpReLU at L0 1% of width", "saelens-jumprelu"),
        ("TopK, k 4", "saelens-topk"), ("TopK, k 4", "sparsify-topk"), ("BatchTopK, k 4", "saelens-batchtopk"),
        ("Matryoshka BatchTopK, k 4", "saelens-matryoshka")]
    for row in result["peers"]:
        name, version = row["peer_library"].split()
        assert pinned[name] == version
        assert row["peer_step_seconds"] == min(row["peer_step_seconds_by_malloc"].values())
        assert row["speedup"] == pytest.approx(row["peer_step_seconds"] / row["ours_step_seconds"])
        assert row["ours_tokens_per_s"] == pytest.approx(256 / row["ours_step_seconds"])
    initial, trained, topk, _, batchtopk, matryoshka = result["peers"]
    assert not initial["ours_sparse_step"] and trained["ours_sparse_step"] and topk["ours_sparse_step"]
    assert batchtopk["ours_sparse_step"] and matryoshka["ours_sparse_step"]
    assert trained["ours_l0"] == pytest.approx(10.2, abs=3) and 3 <= topk["ours_l0"] <= 4
    assert batchtopk["ours_l0"] == pytest.approx(4, abs=0.5) and matryoshka["ours_l0"] == pytest.approx(4, abs=0.5)
