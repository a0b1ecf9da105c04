"""JumpReLU rules: the Gemma Scope 1 L0 penalty and the Gemma Scope 2 target-L0 penalty.

Both use `gemmascope.train.jumprelu`'s straight-through `jumprelu` for the latents
(threshold gradient from the reconstruction). `JumpReLU` counts active latents with
`jumprelu.step` (SPEC.md section 2); `TargetL0JumpReLU` with `tail_step`, the same
count whose threshold pseudo-derivative also reaches latents with no pre-activation near
their threshold. In both dH/dpre = 0: sparsity reaches the encoder only through the
thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Outputs, Params, reconstruct, summarise, threshold
from gemmascope.train.jumprelu import batch_sum, jumprelu, rectangle, step


def _forward(params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array, bandwidth: float):
    """(latents, y_hat, mse) of a JumpReLU encoder."""
    f = jumprelu(pre, threshold(params), bandwidth)
    y_hat, mse = reconstruct(params, f, offset, y)
    return f, y_hat, mse


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def tail_step(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre - theta), with a threshold pseudo-derivative that sees the whole active tail.

    Per latent i, over the rows b of the batch (n_i active rows, s_i their mean excess
    sum_b H(pre_bi - theta_i) (pre_bi - theta_i) / n_i):

        dH(pre_bi - theta_i)/dtheta_i = -(1/eps) K((pre_bi - theta_i)/eps)
                                        - H(pre_bi - theta_i) / max(s_i, eps)
        dH/dpre = 0

    Summed over the batch this is minus an estimate of the pre-activation density at
    theta_i (times B): `jumprelu.step`'s rectangle kernel (SPEC.md section 2), which
    counts the rows within eps/2 of theta, plus n_i / s_i, the density at theta of an
    exponential tail fitted to the active rows (P(pre > theta + d | pre > theta) =
    exp(-d / s), maximum likelihood s = mean excess). The kernel alone is zero for a
    latent whose rows all sit further than eps/2 above its threshold: on Gemma 3 270M's
    layer-6 residual stream, whose mean direction holds ~87% of E||x||^2, a fresh SAE has
    ~100 such always-on latents (theta 0.001, pre-activations 0.03-0.1), neither penalty
    can switch them off, and L0 only falls as fast as the encoder moves (L0 488 -> 160 in
    300 steps against a target of 45). The tail term reaches every latent that fires.
    """
    return (pre > theta).astype(pre.dtype)


def _tail_step_fwd(pre, theta, bandwidth):
    return tail_step(pre, theta, bandwidth), (pre, theta)


def _tail_step_bwd(bandwidth, residuals, g):
    pre, theta = residuals
    rows, g = pre.reshape(-1, theta.shape[-1]), g.reshape(-1, theta.shape[-1])
    excess = rows - theta
    active = (excess > 0).astype(rows.dtype)
    mean_excess = batch_sum(active * excess) / jnp.maximum(batch_sum(active), 1.0)
    density = rectangle(excess / bandwidth) / bandwidth + active / jnp.maximum(mean_excess, bandwidth)
    return jnp.zeros_like(pre), -batch_sum(density * g)


tail_step.defvjp(_tail_step_fwd, _tail_step_bwd)


@dataclass(frozen=True)
class JumpReLU:
    """SPEC.md section 2: loss = mse + sparsity * L0 (the rule a transcoder uses by default).

    With the SAE wiring this is exactly `jumprelu.loss_fn`; with either wiring the trainer
    runs `jumprelu.fused_loss_fn`'s hand-written fused and sparse passes instead, for
    speed, and this rule is the readable definition they are tested against.
    """

    sparsity: float
    bandwidth: float = 0.001

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f, y_hat, mse = _forward(params, pre, offset, y, self.bandwidth)
        active = step(pre, threshold(params), self.bandwidth)
        l0 = jnp.mean(jnp.sum(active, axis=-1))
        loss = mse + self.sparsity * l0
        return loss, summarise(loss, y, y_hat, f, active, {"l0_penalty": self.sparsity * l0})


@dataclass(frozen=True)
class TargetL0JumpReLU:
    """Gemma Scope 2 (SPEC.md 7b): a quadratic pull of the batch L0 towards a target, plus a
    penalty on latents that fire too often.

        loss = mse + c * (L0 / T - 1)^2 + (2 c / T) * c_f * sum_i relu(freq_i - f_max)

    (c `l0_coefficient`, T `target_l0`, c_f `frequency_coefficient`, f_max
    `frequency_threshold`). L0 = mean over rows of sum_i H(pre_i - theta_i), freq_i = mean
    over rows of H(pre_i - theta_i), both through `tail_step`, so the thresholds get the
    gradients, also those of latents that fire on every row.

    Normalisation: the L0 error is relative (L0 / T - 1), so c means the same for a
    target of 10 and of 150: missing by 10% costs 0.01 * c whatever the target. Its
    gradient with respect to L0 is 2 c (L0 / T - 1) / T: a lambda that changes sign,
    lowering thresholds while L0 is under the target. At equilibrium that lambda equals
    the reconstruction's price of a latent, lambda*, so L0 settles at T (1 + lambda* T / (2c)):
    a large c keeps that bias small (measured lambda* ~ 1e-4 to 1e-2 at T 120 to 15).

    The frequency penalty is linear above f_max and in the units of the L0 term: a latent
    firing on more than f_max of the rows pays, per unit of frequency, what every latent
    pays when L0 is c_f * 100% over the target. So it removes dense latents at a price
    the target can always outbid: whatever the width, the data and the target (also
    where f_max is below the mean frequency T / width), it cannot hold L0 more than about
    c_f * 100% under T, because below that the L0 pull lowers every threshold, dense or
    not. A squared hinge would fade out just where it should act.
    """

    target_l0: float
    l0_coefficient: float = 10.0
    frequency_threshold: float = 0.1  # SPEC.md section 6 calls latents above 10% dense
    frequency_coefficient: float = 0.01
    bandwidth: float = 0.001

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        f, y_hat, mse = _forward(params, pre, offset, y, self.bandwidth)
        active = tail_step(pre, threshold(params), self.bandwidth)
        penalty, terms = self.penalty(jnp.mean(jnp.sum(active, axis=-1)), batch_sum(active) / active.shape[0])
        loss = mse + penalty
        return loss, summarise(loss, y, y_hat, f, active, terms)

    def penalty(self, l0: jax.Array, frequency: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the L0 and frequency penalties' sum, the named terms) from the batch's L0 and each
        latent's firing frequency [d_sae]; the sparse step differentiates it on its own."""
        l0_penalty = self.l0_coefficient * (l0 / self.target_l0 - 1.0) ** 2
        dense_price = 2.0 * self.l0_coefficient * self.frequency_coefficient / self.target_l0
        frequency_penalty = dense_price * jnp.sum(jax.nn.relu(frequency - self.frequency_threshold))
        terms = {"l0_penalty": l0_penalty, "frequency_penalty": frequency_penalty,
                 "dense_latents": jnp.sum(frequency > self.frequency_threshold)}
        return l0_penalty + frequency_penalty, terms
