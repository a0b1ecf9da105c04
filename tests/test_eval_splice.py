"""Splicing into the real transformers model (tiny Gemma 2): exact site, exact baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemmascope.config import ModelConfig
from gemmascope.eval.lm import lm_metrics
from gemmascope.eval.splice import splice
from gemmascope.harvest.packing import ROLE_BOS, ROLE_EOS, ROLE_PAD, ROLE_TEXT
from gemmascope.models.capture import ActivationCapture
from gemmascope.models.loading import load_model

LAYER = 2
SITES = ("res", "mlp", "att", "embed")


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="tiny-gemma2"))


@pytest.fixture(scope="module")
def batch():
    """Two sequences: BOS, text, EOS, then padding in the second."""
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 5000, size=(2, 20))
    role = np.full((2, 20), ROLE_TEXT, np.int8)
    role[:, 0], ids[:, 0] = ROLE_BOS, 2
    role[1, 12], ids[1, 12] = ROLE_EOS, 1
    role[1, 13:], ids[1, 13:] = ROLE_PAD, 0
    return ids, role


def layer_of(site: str) -> int:
    return 0 if site == "embed" else LAYER


@pytest.mark.parametrize("site", SITES)
def test_identity_splice_changes_nothing_and_zero_splice_is_zero_ablation(loaded, batch, site):
    (result,) = lm_metrics(loaded, [batch], {(site, layer_of(site)): {
        "identity": lambda a: a.clone(), "zero": torch.zeros_like}}).values()
    identity, zero = result.metrics("identity"), result.metrics("zero")
    assert abs(identity["delta_loss"]) < 1e-6 and abs(identity["kl"]) < 1e-6
    assert identity["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert zero["spliced_loss"] == pytest.approx(zero["zero_ablation_loss"], rel=1e-6)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert zero["zero_ablation_loss"] != pytest.approx(zero["clean_loss"], rel=1e-5)  # the site matters
    # Counted predictions: from TEXT positions to TEXT or EOS targets.
    role = batch[1]
    expected = int(np.sum((role[:, :-1] == ROLE_TEXT) & np.isin(role[:, 1:], (ROLE_TEXT, ROLE_EOS))))
    assert result.tokens == expected == 18 + 11  # positions 1-18 of the first, 1-11 of the second


def _hidden(loaded, ids) -> list[torch.Tensor]:
    """What each decoder layer receives, and what the last one returns (plain hooks of our own)."""
    inputs: dict[int, torch.Tensor] = {}
    layers = loaded.decoder_layers
    handles = [layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].clone()))
               for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            loaded.model.model(input_ids=torch.as_tensor(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [inputs[i] for i in range(len(layers))]


@pytest.mark.parametrize("site", ["res", "mlp", "att"])
def test_splicing_replaces_exactly_its_site(loaded, batch, site):
    """What the next layer receives in the spliced forward, against the layer recomputed by hand."""
    ids = batch[0]
    clean = _hidden(loaded, ids)
    captured = ActivationCapture(loaded, [(s, LAYER) for s in ("res", "mlp", "att")])(torch.as_tensor(ids))
    generator = torch.Generator().manual_seed(1)
    replacement = torch.randn(captured[(site, LAYER)].shape, generator=generator)
    with splice(loaded, site, LAYER, lambda a: replacement.to(a.dtype)):
        spliced = _hidden(loaded, ids)
    for earlier in range(LAYER + 1):  # everything before the site is untouched
        torch.testing.assert_close(spliced[earlier], clean[earlier], rtol=0, atol=0)
    block = loaded.decoder_layers[LAYER]
    x = clean[LAYER]
    with torch.inference_mode():
        if site == "res":
            expected = replacement
        elif site == "mlp":
            expected = captured[("res", LAYER)] - captured[("mlp", LAYER)] + replacement
        else:
            h = x + block.post_attention_layernorm(block.self_attn.o_proj(replacement))
            expected = h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
    torch.testing.assert_close(spliced[LAYER + 1], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced[LAYER + 1], clean[LAYER + 1])
