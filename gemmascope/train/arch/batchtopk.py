"""The BatchTopK SAE of Bussmann et al. 2024, and its conversion to a JumpReLU SAE.

Training keeps the B * k largest activations of the whole batch (after ReLU), so the
*mean* L0 is k while each row takes as many latents as it needs:

    f = where(in the batch's top B*k of relu(pre), relu(pre), 0)
    loss = mse + aux_coefficient * auxk

A row's latents depend on the rest of its batch, which inference cannot have. The
batch rule keeps exactly the activations above the batch's (B*k)-th largest value, so
one global threshold theta, the running estimate of the smallest kept positive
activation, turns the SAE into a JumpReLU SAE with theta for every latent
(`batchtopk_to_jumprelu`): exportable in the Gemma Scope format, same active sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gemmascope.train.arch.auxk import auxk_terms
from gemmascope.train.arch.base import Outputs, Params, reconstruct, summarise
from gemmascope.train.arch.select import batch_topk_mask


def batch_topk_latents(pre: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(latents, smallest kept positive activation: +inf when none) of the batch rule."""
    activation = jax.nn.relu(pre)
    f = jnp.where(batch_topk_mask(activation, pre.shape[0] * k), activation, 0.0)
    kept_minimum = jnp.min(jnp.where(f > 0, jax.lax.stop_gradient(f), jnp.inf))
    return f, kept_minimum


@dataclass(frozen=True)
class BatchTopK:
    k: int
    aux_k: int = 512
    aux_coefficient: float = 1.0 / 32.0

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f, kept_minimum = batch_topk_latents(pre, self.k)
        y_hat, mse = reconstruct(params, f, offset, y)
        aux, terms = auxk_terms(params, pre, y, y_hat, dead, self.aux_k, self.aux_coefficient)
        loss = mse + aux
        return loss, summarise(loss, y, y_hat, f, f > 0, {**terms, "kept_minimum": kept_minimum})


class ThresholdEstimate(NamedTuple):
    """An exponential moving average of the batches' smallest kept activation, debiased.

    After n updates with minima m_1..m_n, total = sum_t rate (1 - rate)^(n - t) m_t and
    weight = 1 - (1 - rate)^n, the sum of those weights; `value` = total / weight is a
    weighted mean of the minima seen. The EMA (Bussmann et al. use rate 0.01) forgets
    the early batches, whose activations come from a barely trained encoder, over
    about 1 / rate steps; dividing by the weight (as Adam debiases its moments) keeps
    the first estimates from being pulled towards the zero start.
    """

    total: jax.Array
    weight: jax.Array

    @classmethod
    def zero(cls) -> ThresholdEstimate:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    @property
    def value(self) -> jax.Array:
        """The global threshold theta (nan before the first update)."""
        return self.total / self.weight

    def update(self, kept_minimum: jax.Array, rate: float = 0.01) -> ThresholdEstimate:
        """Fold in one batch's `Outputs.terms["kept_minimum"]`; a batch with no positive
        kept activation (+inf) leaves the estimate unchanged."""
        seen = jnp.isfinite(kept_minimum)
        total = jnp.where(seen, (1.0 - rate) * self.total + rate * kept_minimum, self.total)
        weight = jnp.where(seen, (1.0 - rate) * self.weight + rate, self.weight)
        return ThresholdEstimate(total, weight)


def batchtopk_to_jumprelu(params: Params, theta: jax.Array | float) -> Params:
    """The inference-time SAE: the same weights with log_threshold = log(theta) for every
    latent, for the `JumpReLU` rule and the Gemma Scope export (`release.to_release`
    reads the same five fields). pre > theta > 0 implies relu(pre) = pre, so its latents
    are exactly the activations above the global threshold."""
    d_sae = params.b_enc.shape[-1]
    return params._replace(log_threshold=jnp.full((d_sae,), jnp.log(theta), jnp.float32))
