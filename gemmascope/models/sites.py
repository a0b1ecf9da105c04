"""The site registry: where each activation of SPEC.md section 1 lives in a decoder layer.

A Gemma 2 / Gemma 3 decoder layer in `transformers` computes

    h   = x + post_attention_layernorm(self_attn(input_layernorm(x)))
    out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

and every site is either the output of one submodule or the input of one, so a single
forward hook per (site, layer) captures it without touching the model's code.
This module imports no torch so configs can validate site names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gemmascope.errors import UserError

Key = tuple[str, int]  # (site, layer): one captured activation array


@dataclass(frozen=True)
class Site:
    name: str
    # Dotted path of the submodule inside a decoder layer ("" is the layer itself).
    module: str
    # Capture the module's "output" (forward hook) or its first "input" (pre-hook).
    capture: Literal["output", "input"]
    # How d_in follows from the model config: "d_model" or "heads" (n_heads * head_dim).
    width: Literal["d_model", "heads"]
    description: str
    transformer_lens: str


SITES: dict[str, Site] = {
    "res": Site("res", "", "output", "d_model",
                "residual stream after the block (the layer output)", "blocks.{L}.hook_resid_post"),
    "mlp": Site("mlp", "post_feedforward_layernorm", "output", "d_model",
                "MLP output after post_feedforward_layernorm", "blocks.{L}.hook_mlp_out"),
    "att": Site("att", "self_attn.o_proj", "input", "heads",
                "per-head attention outputs concatenated, the input of o_proj", "blocks.{L}.attn.hook_z"),
    "mlp_in": Site("mlp_in", "pre_feedforward_layernorm", "output", "d_model",
                   "MLP input after pre_feedforward_layernorm", "blocks.{L}.ln2.hook_normalized"),
    # The scaled token embeddings are what decoder layer 0 receives; they exist once per
    # model, so "embed" is only defined at layer 0.
    "embed": Site("embed", "", "input", "d_model",
                  "token embeddings times sqrt(d_model), the input of layer 0", "hook_embed"),
}

# Sites that exist at one layer only.
SINGLE_LAYER_SITES = {"embed": 0}


def exists_at(site: str, layer: int) -> bool:
    return SINGLE_LAYER_SITES.get(site, layer) == layer

# Submodules every supported decoder layer must have; checked once when a model loads.
REQUIRED_LAYER_MODULES = (
    "input_layernorm",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "mlp",
    "post_feedforward_layernorm",
)


def site_width(site: str, d_model: int, n_heads: int, head_dim: int) -> int:
    """d_in of a site's activations."""
    return d_model if SITES[site].width == "d_model" else n_heads * head_dim


def find_submodule(layer: object, dotted: str) -> object:
    node = layer
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part)
    return node


def check_layer_modules(layers: object, model_name: str) -> None:
    """Fail with one line if the decoder layers are not Gemma-shaped."""
    for index, layer in enumerate(layers):
        for dotted in REQUIRED_LAYER_MODULES:
            try:
                find_submodule(layer, dotted)
            except AttributeError:
                raise UserError(
                    f"{model_name}: layer {index} has no submodule {dotted!r}; "
                    "sites are defined for Gemma 2 / Gemma 3 decoder layers only"
                ) from None
