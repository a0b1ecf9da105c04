"""The Gemma decoder in Flax, built only as deep as the harvest needs.

`GemmaModel(arch, n_layers=L + 1)` has the embedding and layers 0..L only: a harvest
whose last requested layer is L neither loads nor runs anything after it (no final norm,
no LM head). Built with every layer it also returns logits, which the parity tests
compare against transformers.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemmascope.models.jax_gemma.architecture import GemmaArchitecture
from gemmascope.models.jax_gemma.layers import DecoderLayer, RMSNorm, matmul_precision
from gemmascope.models.sites import Key


class Embedding(nn.Module):
    vocab_size: int
    d_model: int
    dtype: Any

    def setup(self) -> None:
        self.weight = self.param("weight", nn.initializers.zeros, (self.vocab_size, self.d_model), self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # sqrt(d_model) rounded to the compute dtype first, as transformers does.
        scale = jnp.asarray(math.sqrt(self.d_model), self.dtype)
        return jnp.take(self.weight, ids, axis=0) * scale

    def attend(self, x: jax.Array) -> jax.Array:
        """The tied LM head: x E^T."""
        return jnp.einsum("btd,vd->btv", x, self.weight, precision=matmul_precision(self.dtype))


class GemmaModel(nn.Module):
    arch: GemmaArchitecture
    n_layers: int  # layers built: the last one needed + 1, or arch.n_layers for logits
    dtype: Any = jnp.float32

    def setup(self) -> None:
        a = self.arch
        self.embed_tokens = Embedding(a.vocab_size, a.d_model, self.dtype)
        self.layers = [DecoderLayer(a, i, self.dtype) for i in range(self.n_layers)]
        if self.n_layers == a.n_layers:
            self.norm = RMSNorm(a.d_model, a.rms_norm_eps, self.dtype)

    def __call__(self, ids: jax.Array, keys: tuple[Key, ...], out_dtype: Any,
                 logits: bool = False) -> tuple[dict[Key, jax.Array], jax.Array | None]:
        """The activations at `keys` (`[batch, time, width]` in `out_dtype`), and the
        logits (float32, after the final soft-cap) when asked, else None."""
        captured: dict[Key, jax.Array] = {}
        x = self.embed_tokens(ids)
        if ("embed", 0) in keys:
            captured[("embed", 0)] = x.astype(out_dtype)
        last = max((layer for _, layer in keys), default=-1)
        depth = self.n_layers if logits else last + 1
        for index in range(depth):
            x, sites = self.layers[index](x)
            for site, value in sites.items():
                if (site, index) in keys:
                    captured[(site, index)] = value.astype(out_dtype)
        if not logits:
            return captured, None
        out = self.embed_tokens.attend(self.norm(x)).astype(jnp.float32)
        cap = self.arch.final_logit_softcap
        return captured, (out if cap is None else jnp.tanh(out / cap) * cap)


def expected_params(arch: GemmaArchitecture, n_layers: int, dtype: Any) -> Any:
    """The parameter tree (shapes and dtypes only) of a model built with `n_layers`."""
    module = GemmaModel(arch, n_layers, dtype)
    full = n_layers == arch.n_layers
    probe = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), probe, (("res", n_layers - 1),), "float32", full))["params"]
