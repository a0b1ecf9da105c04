"""The TopK SAE of Gao et al. 2024: each row keeps its k largest pre-activations.

    f = relu(TopK_k(pre))        loss = mse + aux_coefficient * auxk

L0 is at most k by construction (fewer where a kept pre-activation is negative), so
there is no sparsity penalty; AuxK (`auxk.py`) revives latents the trainer reports dead.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gemmascope.train.arch.auxk import auxk_terms
from gemmascope.train.arch.base import Outputs, Params, reconstruct, summarise
from gemmascope.train.arch.select import row_topk_mask


@dataclass(frozen=True)
class TopK:
    k: int
    aux_k: int = 512  # Gao et al.: a power of two near d_in / 2
    aux_coefficient: float = 1.0 / 32.0

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f = jnp.where(row_topk_mask(pre, self.k), jax.nn.relu(pre), 0.0)
        y_hat, mse = reconstruct(params, f, offset, y)
        aux, terms = auxk_terms(params, pre, y, y_hat, dead, self.aux_k, self.aux_coefficient)
        loss = mse + aux
        return loss, summarise(loss, y, y_hat, f, f > 0, terms)
