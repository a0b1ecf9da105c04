"""The report's index page: one frontier line per (stream, architecture), each SAE labelled
by its own architecture's knob, and feature-page links that stay unique."""

from __future__ import annotations

import re

from gemmascope.report.pages import index_page


def entry(name: str, sparsity: float | None, l0: float, architecture: str | None = "jumprelu", **extra) -> dict:
    record = {"site": "res", "layer": 6, "width": 1024, "sparsity": sparsity, "name": name, "l0": l0,
              "fvu": 0.1, "delta_loss": 0.05 * 100 / l0, "kl": 0.01, "loss_recovered": 0.9,
              "dead_fraction": 0.0, "dense_fraction": 0.0, "canonical": False, "source": None,
              "density_histogram": {"dead": 0, "counts": [1, 2], "log10_edges": [-3.0, -2.0, -1.0]}, **extra}
    if architecture is not None:
        record["architecture"] = architecture
    return record


def series_names(html: str) -> set[str]:
    """The frontier line each plotted point belongs to (its tooltip: "<line>: L0 ..., ...")."""
    return set(re.findall(r"<title>([^<:]+): L0", html))


def test_each_architecture_is_its_own_frontier_and_label():
    saes = [entry("w1024-s0.0003", 3e-4, 160), entry("w1024-s0.003", 3e-3, 40),
            entry("w1024-btk32", 32, 32, "batchtopk"), entry("w1024-btk64", 64, 64, "batchtopk"),
            entry("w1024-k32", 32, 32, "topk"), entry("w1024-l0_45", 45, 47, "jumprelu_target_l0"),
            entry("w1024-s0.01", 0.01, 90, None)]  # an index written before architectures: JumpReLU
    html = index_page({"model": "test", "saes": saes})
    assert series_names(html) == {"res L6 1k", "res L6 1k batchtopk", "res L6 1k topk",
                                  "res L6 1k jumprelu_target_l0"}
    for label in ("&lambda; 0.0003", "BatchTopK k=32", "TopK k=32", "target L0 45", "&lambda; 0.01"):
        assert f", {label} (L0" in html, label
    links = re.findall(r'href="features/([^"]+)\.html"', html)
    assert len(links) == len(set(links)) == 7  # btk32 and k32 share a knob value, not a page
    assert "res-L6-w1k-s0.0003" in links and "res-L6-w1k-s0.01" in links and "res-L6-w1k-btk32" in links and "res-L6-w1k-k32" in links
    assert "<td>batchtopk</td>" in html and html.count("<td>jumprelu</td>") == 3


def test_transcoders_are_streams_of_their_own_beside_the_mlp_saes_of_their_layer():
    saes = [entry("w1024-s0.001", 1e-3, 120, site="mlp", layer=3),
            entry("w1024-s0.001", 1e-3, 150, site="mlp_in", target="mlp", skip=False, layer=3),
            entry("w1024-s0.01", 1e-2, 40, site="mlp_in", target="mlp", skip=False, layer=3),
            entry("w1024-s0.001-skip", 1e-3, 90, site="mlp_in", target="mlp", skip=True, layer=3),
            entry("w1024-s0.003", 3e-3, 60, site="mlp_in", layer=3)]  # an SAE of mlp_in: no target
    html = index_page({"model": "test", "saes": saes})
    assert series_names(html) == {"mlp L3 1k", "mlp_in-&gt;mlp L3 1k", "mlp_in-&gt;mlp skip L3 1k", "mlp_in L3 1k"}
    links = re.findall(r'href="features/([^"]+)\.html"', html)
    assert sorted(links) == ["mlp-L3-w1k-s0.001", "mlp_in-L3-w1k-s0.003", "mlp_in-to-mlp-L3-w1k-s0.001",
                             "mlp_in-to-mlp-L3-w1k-s0.001-skip", "mlp_in-to-mlp-L3-w1k-s0.01"]
    assert html.count("<td>mlp_in-&gt;mlp</td>") == 2 and html.count("<td>mlp_in-&gt;mlp skip</td>") == 1


def test_a_topk_sae_is_read_from_its_saelens_files_with_its_k(tmp_path):
    """TopK SAEs have no params.npz (index "path": null): the report reads their SAELens files."""
    import numpy as np

    from gemmascope.export.saelens import saelens_files
    from gemmascope.report.pages import _released
    from gemmascope.train.release import release_encode

    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": rng.normal(size=16),
              "b_dec": rng.normal(size=8)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    weights, cfg = saelens_files(arrays, site="res", layer=6, model_name="m", context_size=8, dataset="d", k=3)
    folder = tmp_path / "saelens" / "res" / "layer_6" / "width_16" / "average_l0_3"
    folder.mkdir(parents=True)
    (folder / "sae_weights.safetensors").write_bytes(weights)
    (folder / "cfg.json").write_bytes(cfg)
    released, k = _released(str(tmp_path), None, entry("w16-k3", 3, 3, "topk", k=3, path=None,
                                                       saelens_path="saelens/res/layer_6/width_16/average_l0_3"))
    assert k == 3 and sorted(released) == sorted(arrays)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    assert (np.count_nonzero(release_encode(released, x, k), axis=1) <= 3).all()
