"""The ReLU SAE with a decoder-norm-weighted L1 penalty: the classic baseline.

    f = relu(pre)      loss = mse + l1_coefficient * mean_rows sum_i f_i * ||W_dec_i||

Weighting each latent's activation by its decoder row norm makes the penalty invariant
to moving scale between encoder and decoder (otherwise L1 is lowered for free by
shrinking f and growing W_dec). With the trainer's unit-norm rows the weights are 1,
but the gradient still reaches W_dec through the norm, which is what keeps the penalty
honest if the constraint is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Outputs, Params, reconstruct, summarise


@dataclass(frozen=True)
class ReLUL1:
    l1_coefficient: float

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f = jax.nn.relu(pre)
        y_hat, mse = reconstruct(params, f, offset, y)
        l1 = jnp.mean(f @ jnp.linalg.norm(params.W_dec, axis=-1))
        loss = mse + self.l1_coefficient * l1
        return loss, summarise(loss, y, y_hat, f, f > 0, {"l1": l1})
