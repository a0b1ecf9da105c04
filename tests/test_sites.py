"""Activation capture against an independent float64 numpy recomputation of each layer.

For a decoder layer L the reference starts from HF's `hidden_states[L]` (the layer's
input) and recomputes the whole Gemma 2 / Gemma 3 block from the weight matrices alone
(no torch submodule is called):

    a      = RMSNorm_in(x)
    q,k,v  = a Wq^T, a Wk^T, a Wv^T            (Gemma 3: q_norm / k_norm per head)
    q,k    = RoPE(q), RoPE(k)                   (rotate-half, theta per layer type)
    s      = q k^T * query_pre_attn_scalar^-0.5 (Gemma 2: tanh(s/cap)*cap), causal, softmax
    att    = concat_heads(softmax(s) v)                          -> site "att"
    h      = x + RMSNorm_post_attn(att Wo^T)
    mlp_in = RMSNorm_pre_ff(h)                                   -> site "mlp_in"
    mlp    = RMSNorm_post_ff((gelu_tanh(mlp_in Wg^T) * mlp_in Wu^T) Wd^T) -> site "mlp"
    res    = h + mlp                                             -> site "res"

with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (1 + w).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from gemmascope.config import ModelConfig
from gemmascope.errors import UserError
from gemmascope.models.capture import ActivationCapture
from gemmascope.models.loading import load_model
from gemmascope.models.sites import REQUIRED_LAYER_MODULES, SITES, check_layer_modules

MODELS = ["tiny-gemma2", "gemma3-270m"]
SITE_NAMES = ("res", "att", "mlp", "mlp_in")
BATCH, SEQ = 2, 24
BOS = 2
# max |captured - reference| / max |reference|: float32 forward vs float64 reference.
REL_TOL = 1e-4


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    return load_model(ModelConfig(source=request.param, device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def input_ids(loaded):
    assert loaded.tokenizer.bos_token_id == BOS
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 5000, (BATCH, SEQ), generator=generator)
    ids[:, 0] = BOS
    # Sequences shorter than the sliding window: every layer is plainly causal.
    assert loaded.model.config.sliding_window > SEQ
    return ids


@pytest.fixture(scope="module")
def hidden_states(loaded, input_ids):
    """HF's hidden states: [0] is the scaled embedding, [L] the input of layer L."""
    with torch.inference_mode():
        out = loaded.model.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    states = [h.detach().double().numpy() for h in out.hidden_states]
    assert len(states) == loaded.info.n_layers + 1
    return states


def _layers_to_check(loaded) -> list[int]:
    """First, middle, last, and (Gemma 3) the first full-attention layer."""
    n = loaded.info.n_layers
    layers = {0, n // 2, n - 1}
    layer_types = getattr(loaded.model.config, "layer_types", None) or []
    for kind in ("sliding_attention", "full_attention"):
        if kind in layer_types:
            layers.add(layer_types.index(kind))
    return sorted(layers)


@pytest.fixture(scope="module")
def captured(loaded, input_ids):
    """All four sites at every checked layer, in one capture call."""
    keys = [(site, layer) for layer in _layers_to_check(loaded) for site in SITE_NAMES]
    out = ActivationCapture(loaded, keys)(input_ids)
    return {key: value.detach().double().numpy() for key, value in out.items()}


# --------------------------------------------------------------------------- numpy reference


def _w(module) -> np.ndarray:
    return module.weight.detach().numpy().astype(np.float64)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + weight)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_theta(config, layer: int) -> float:
    params = getattr(config, "rope_parameters", None)
    layer_types = getattr(config, "layer_types", None)
    if params and layer_types and layer_types[layer] in params:
        params = params[layer_types[layer]]  # Gemma 3: one set of parameters per layer type
    if params:
        assert params.get("rope_type", "default") == "default", params
        return float(params["rope_theta"])
    return float(config.rope_theta)


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x: [batch, heads, seq, head_dim], positions 0..seq-1."""
    head_dim, seq = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [seq, head_dim]
    return x * np.cos(emb) + _rotate_half(x) * np.sin(emb)


def reference_layer(
    loaded, layer: int, x: np.ndarray, softcap: bool = True
) -> dict[str, np.ndarray]:
    """Recompute decoder layer `layer` on its input x [batch, seq, d_model] in float64.

    Returns the four sites, plus "max_score": max |q.k * scale| before soft-capping.
    """
    config = loaded.model.config
    module = loaded.decoder_layers[layer]
    attn, mlp = module.self_attn, module.mlp
    eps = float(config.rms_norm_eps)
    n_heads, head_dim = config.num_attention_heads, config.head_dim
    n_kv = config.num_key_value_heads
    batch, seq, _ = x.shape

    a = _rms_norm(x, _w(module.input_layernorm), eps)

    def heads(t: np.ndarray, n: int) -> np.ndarray:  # [b, s, n*hd] -> [b, n, s, hd]
        return t.reshape(batch, seq, n, head_dim).transpose(0, 2, 1, 3)

    q = heads(a @ _w(attn.q_proj).T, n_heads)
    k = heads(a @ _w(attn.k_proj).T, n_kv)
    v = heads(a @ _w(attn.v_proj).T, n_kv)
    if loaded.info.family == "gemma3":
        q = _rms_norm(q, _w(attn.q_norm), eps)
        k = _rms_norm(k, _w(attn.k_norm), eps)
    else:
        assert not hasattr(attn, "q_norm")
    theta = _rope_theta(config, layer)
    q, k = _rope(q, theta), _rope(k, theta)
    # Grouped-query attention: query head h reads kv head h // (n_heads / n_kv).
    k = np.repeat(k, n_heads // n_kv, axis=1)
    v = np.repeat(v, n_heads // n_kv, axis=1)

    scores = (q @ k.transpose(0, 1, 3, 2)) * float(config.query_pre_attn_scalar) ** -0.5
    max_score = np.max(np.abs(scores))
    cap = getattr(config, "attn_logit_softcapping", None)
    if loaded.info.family == "gemma2":
        assert cap == 50.0
    if cap is not None and softcap:
        scores = np.tanh(scores / cap) * cap
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    att = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, n_heads * head_dim)

    h = x + _rms_norm(att @ _w(attn.o_proj).T, _w(module.post_attention_layernorm), eps)
    mlp_in = _rms_norm(h, _w(module.pre_feedforward_layernorm), eps)
    inner = _gelu_tanh(mlp_in @ _w(mlp.gate_proj).T) * (mlp_in @ _w(mlp.up_proj).T)
    mlp_out = _rms_norm(inner @ _w(mlp.down_proj).T, _w(module.post_feedforward_layernorm), eps)
    return {
        "att": att,
        "mlp_in": mlp_in,
        "mlp": mlp_out,
        "res": h + mlp_out,
        "max_score": max_score,
    }


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# --------------------------------------------------------------------------- tests


def test_sites_match_numpy_reference(loaded, input_ids, hidden_states, captured):
    info = loaded.info
    layers = _layers_to_check(loaded)
    assert info.n_layers - 1 in layers and 0 in layers and len(layers) >= 3
    assert set(captured) == {(s, layer) for s in SITE_NAMES for layer in layers}
    failures = []
    for layer in layers:
        reference = reference_layer(loaded, layer, hidden_states[layer])
        for site in SITE_NAMES:
            width = info.n_heads * info.head_dim if site == "att" else info.d_model
            assert captured[(site, layer)].shape == (BATCH, SEQ, width), (site, layer)
            err = rel_err(captured[(site, layer)], reference[site])
            print(f"{info.name} {site}@{layer}: rel err {err:.2e}")
            if not err < REL_TOL:
                failures.append(f"{site}@{layer}: rel err {err:.2e}")
    assert not failures, failures


def test_res_matches_next_hidden_state(loaded, hidden_states, captured):
    # hidden_states[n_layers] has the final norm applied, so the last layer is excluded.
    layers = [layer for layer in _layers_to_check(loaded) if layer < loaded.info.n_layers - 1]
    assert layers
    for layer in layers:
        err = rel_err(captured[("res", layer)], hidden_states[layer + 1])
        print(f"{loaded.info.name} res@{layer} vs hidden_states[{layer + 1}]: rel err {err:.2e}")
        assert err < REL_TOL, (layer, err)


def test_last_layer_res_is_before_final_norm(loaded, input_ids, hidden_states, captured):
    """The last layer's res is the raw block output, not HF's normed last hidden state."""
    last = loaded.info.n_layers - 1
    res = captured[("res", last)]
    final = hidden_states[last + 1]
    assert rel_err(res, final) > 1e-2
    config = loaded.model.config
    normed = _rms_norm(res, _w(loaded.model.model.norm), float(config.rms_norm_eps))
    assert rel_err(normed, final) < REL_TOL


def test_single_att_capture_stops_after_its_layer(loaded, input_ids, captured):
    layer = loaded.info.n_layers // 2
    layers = loaded.decoder_layers
    ran: dict[str, int] = {"this": 0, "next": 0, "norm": 0}

    def counter(name):
        def hook(module, args, output):
            ran[name] += 1

        return hook

    def hook_ids():  # transformers keeps hooks of its own installed; compare before/after
        return {
            (name, kind, hook_id)
            for name, module in loaded.model.named_modules()
            for kind, hooks in (("fwd", module._forward_hooks), ("pre", module._forward_pre_hooks))
            for hook_id in hooks
        }

    hooks_before = hook_ids()
    handles = [
        layers[layer].register_forward_hook(counter("this")),
        layers[layer + 1].register_forward_hook(counter("next")),
        loaded.model.model.norm.register_forward_hook(counter("norm")),
    ]
    try:
        out = ActivationCapture(loaded, [("att", layer)])(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    assert set(out) == {("att", layer)}
    assert ran == {"this": 1, "next": 0, "norm": 0}
    single = out[("att", layer)].detach().double().numpy()
    assert single.shape == (BATCH, SEQ, loaded.info.n_heads * loaded.info.head_dim)
    # Same activations as the all-sites capture.
    assert rel_err(single, captured[("att", layer)]) < 1e-6
    # The hooks the capture registered are gone again.
    assert hook_ids() == hooks_before


def test_gemma2_attention_is_soft_capped(loaded, input_ids):
    """The random tiny model's scores are far below the cap, so the comparison above cannot
    see soft-capping; on a copy with q_proj scaled up the scores exceed it, and the capture
    must still match the capped reference (this fails if Gemma 2 runs without eager attention).
    """
    if loaded.info.family != "gemma2":
        pytest.skip("Gemma 3 has no attention logit soft-capping")
    layer = 1
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        model.model.layers[layer].self_attn.q_proj.weight.mul_(2000.0)
    boosted = dataclasses.replace(loaded, model=model)
    with torch.inference_mode():
        x = model.model(input_ids=input_ids, output_hidden_states=True).hidden_states[layer]
    x = x.double().numpy()
    capped = reference_layer(boosted, layer, x)
    uncapped = reference_layer(boosted, layer, x, softcap=False)
    cap = model.config.attn_logit_softcapping
    assert capped["max_score"] > 2 * cap  # the cap really bites
    assert rel_err(uncapped["att"], capped["att"]) > 1e-2  # and changes the attention output
    out = ActivationCapture(boosted, [(site, layer) for site in SITE_NAMES])(input_ids)
    for site in SITE_NAMES:
        err = rel_err(out[(site, layer)].double().numpy(), capped[site])
        print(f"{loaded.info.name} (q_proj x2000) {site}@{layer}: rel err {err:.2e}")
        assert err < REL_TOL, (site, err)


def test_check_layer_modules_accepts_real_layers(loaded):
    check_layer_modules(loaded.decoder_layers, loaded.info.name)


# The submodules the capture relies on, written out independently of the package.
_NEEDED = (
    "input_layernorm",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "mlp",
    "post_feedforward_layernorm",
)


def test_required_modules_cover_the_sites():
    assert set(_NEEDED) <= set(REQUIRED_LAYER_MODULES)
    for site in SITES.values():
        assert site.module == "" or site.module in REQUIRED_LAYER_MODULES


def test_check_layer_modules_rejects_bare_module():
    with pytest.raises(UserError) as excinfo:
        check_layer_modules([torch.nn.Module()], "dummy-model")
    message = str(excinfo.value)
    assert "dummy-model" in message
    assert "input_layernorm" in message  # the first required submodule
    assert "\n" not in message


def _layer_without(missing: str) -> torch.nn.Module:
    layer = torch.nn.Module()
    for dotted in REQUIRED_LAYER_MODULES:
        if dotted == missing:
            continue
        node = layer
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if not hasattr(node, leaf):
            node.add_module(leaf, torch.nn.Identity())
    return layer


@pytest.mark.parametrize("missing", _NEEDED)
def test_check_layer_modules_names_the_missing_submodule(missing):
    complete = _layer_without("")
    check_layer_modules([complete], "ok")
    with pytest.raises(UserError) as excinfo:
        check_layer_modules([complete, _layer_without(missing)], "dummy-model")
    message = str(excinfo.value)
    assert missing in message


def test_embed_is_the_scaled_token_embedding(loaded, input_ids, hidden_states):
    """`embed` at layer 0: embedding rows times sqrt(d_model), what layer 0 receives."""
    out = ActivationCapture(loaded, [("embed", 0)])(input_ids)
    embed = out[("embed", 0)].detach().double().numpy()
    weights = _w(loaded.model.model.embed_tokens)
    reference = weights[input_ids.numpy()] * math.sqrt(loaded.info.d_model)
    assert embed.shape == (BATCH, SEQ, loaded.info.d_model)
    assert rel_err(embed, reference) < REL_TOL
    assert rel_err(embed, hidden_states[0]) < 1e-6
