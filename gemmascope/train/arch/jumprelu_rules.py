"""JumpReLU rules: the Gemma Scope 1 L0 penalty and the Gemma Scope 2 target-L0 penalty.

Both use `gemmascope.train.jumprelu`'s straight-through primitives: `jumprelu` for the
latents (threshold gradient from the reconstruction) and `step` for every count of
active latents (threshold gradient from the penalty; dH/dpre = 0, so sparsity reaches
the encoder only through the thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Outputs, Params, reconstruct, summarise, threshold
from gemmascope.train.jumprelu import jumprelu, step


def _forward(params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array, bandwidth: float):
    """(latents, straight-through active indicator, y_hat, mse) of a JumpReLU encoder."""
    theta = threshold(params)
    f = jumprelu(pre, theta, bandwidth)
    y_hat, mse = reconstruct(params, f, offset, y)
    return f, step(pre, theta, bandwidth), y_hat, mse


@dataclass(frozen=True)
class JumpReLU:
    """SPEC.md section 2: loss = mse + sparsity * L0 (the rule a transcoder uses by default).

    With the SAE wiring this is exactly `jumprelu.loss_fn`, whose fused and sparse
    backward passes the trainer keeps for speed; this rule exists so the same
    nonlinearity plugs into a transcoder.
    """

    sparsity: float
    bandwidth: float = 0.001

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f, active, y_hat, mse = _forward(params, pre, offset, y, self.bandwidth)
        l0 = jnp.mean(jnp.sum(active, axis=-1))
        loss = mse + self.sparsity * l0
        return loss, summarise(loss, y, y_hat, f, active, {"l0_penalty": self.sparsity * l0})


@dataclass(frozen=True)
class TargetL0JumpReLU:
    """Gemma Scope 2 (SPEC.md 7b): a quadratic pull of the batch L0 towards a target, plus a
    penalty on latents that fire too often.

        loss = mse + l0_coefficient * (L0 / target_l0 - 1)^2
                   + frequency_coefficient * sum_i relu(freq_i - frequency_threshold)

    L0 = mean over rows of sum_i H(pre_i - theta_i), freq_i = mean over rows of
    H(pre_i - theta_i), both through `step`, so thresholds get the gradients.

    Normalisation: the L0 error is relative (L0 / target - 1), so the coefficient means
    the same for a target of 10 and of 150: missing by 10% costs 0.01 * l0_coefficient
    whatever the target, and one coefficient serves the small/medium/big grid. Its
    gradient with respect to L0 is 2 * l0_coefficient * (L0 / target - 1) / target: a
    lambda that changes sign, lowering thresholds while L0 is under the target.

    The frequency penalty is linear above the threshold: every latent firing on more
    than `frequency_threshold` of the rows gets an extra L0-style coefficient
    `frequency_coefficient` on its own threshold (in units of the fraction of rows), and
    the others get none, so it removes dense latents without moving the global L0
    target. A squared hinge would fade out just where it should act.
    """

    target_l0: float
    l0_coefficient: float = 1.0
    frequency_threshold: float = 0.1  # SPEC.md section 6 calls latents above 10% dense
    frequency_coefficient: float = 1.0
    bandwidth: float = 0.001

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f, active, y_hat, mse = _forward(params, pre, offset, y, self.bandwidth)
        l0 = jnp.mean(jnp.sum(active, axis=-1))
        l0_penalty = self.l0_coefficient * (l0 / self.target_l0 - 1.0) ** 2
        frequency = jnp.mean(active, axis=0)
        frequency_penalty = self.frequency_coefficient * jnp.sum(jax.nn.relu(frequency - self.frequency_threshold))
        loss = mse + l0_penalty + frequency_penalty
        terms = {"l0_penalty": l0_penalty, "frequency_penalty": frequency_penalty,
                 "dense_latents": jnp.sum(frequency > self.frequency_threshold)}
        return loss, summarise(loss, y, y_hat, f, active, terms)
