"""The numbers a Gemma 2 / Gemma 3 forward needs, read from the config transformers uses.

Both backends read the same `config.json` through `transformers.AutoConfig`, so a model
the torch backend loads is described identically here; anything this forward does not
implement (an untied LM head, a RoPE variant, another activation) is refused by name
instead of being computed wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gemmascope.errors import UserError
from gemmascope.models.loading import read_info

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base frequency and linear position scaling."""

    theta: float
    linear_factor: float = 1.0


@dataclass(frozen=True)
class GemmaArchitecture:
    family: str  # "gemma2" or "gemma3"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    query_pre_attn_scalar: float
    rms_norm_eps: float
    # Keys attend to queries at most `sliding_window - 1` positions back on sliding layers.
    sliding_window: int | None
    layer_types: tuple[str, ...]
    rope: tuple[tuple[str, Rope], ...]  # (layer type, its RoPE)
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    qk_norm: bool  # Gemma 3 normalises queries and keys per head

    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def rope_for(self, layer: int) -> Rope:
        return dict(self.rope)[self.layer_types[layer]]

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING and self.sliding_window is not None


def _rope(name: str, parameters: dict) -> Rope:
    kind = parameters.get("rope_type", "default")
    if kind == "default":
        return Rope(float(parameters["rope_theta"]))
    if kind == "linear":
        return Rope(float(parameters["rope_theta"]), float(parameters["factor"]))
    raise UserError(f"{name}: rope_type {kind!r} is not supported by the jax backend (default, linear)")


def from_hf_config(name: str, hf: Any) -> GemmaArchitecture:
    """Read a `Gemma2Config` / `Gemma3TextConfig`; `name` labels errors."""
    family = read_info(name, hf).family
    if hf.hidden_activation != "gelu_pytorch_tanh":
        raise UserError(f"{name}: hidden_activation {hf.hidden_activation!r} is not supported (gelu_pytorch_tanh)")
    if not getattr(hf, "tie_word_embeddings", True):
        raise UserError(f"{name}: an untied LM head is not supported (Gemma ties it to the embeddings)")
    if getattr(hf, "attention_bias", False):
        raise UserError(f"{name}: attention biases are not supported (Gemma has none)")
    if getattr(hf, "use_bidirectional_attention", False):
        raise UserError(f"{name}: bidirectional attention is not supported (a causal LM is harvested)")
    layer_types = tuple(hf.layer_types)
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise UserError(f"{name}: layer type {unknown[0]!r} is not supported")
    rope_parameters = hf.rope_parameters
    if family == "gemma2" or "rope_theta" in rope_parameters:
        shared = _rope(name, rope_parameters)
        rope = tuple((kind, shared) for kind in (SLIDING, FULL))
    else:
        rope = tuple((kind, _rope(name, rope_parameters[kind])) for kind in (SLIDING, FULL))
    return GemmaArchitecture(
        family=family,
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        head_dim=hf.head_dim,
        d_ff=hf.intermediate_size,
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        rms_norm_eps=float(hf.rms_norm_eps),
        sliding_window=hf.sliding_window,
        layer_types=layer_types,
        rope=rope,
        attn_logit_softcap=hf.attn_logit_softcapping if family == "gemma2" else None,
        final_logit_softcap=hf.final_logit_softcapping,
        qk_norm=family == "gemma3",
    )
