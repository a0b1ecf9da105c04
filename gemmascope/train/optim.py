"""Optimiser and schedules of SPEC.md section 2, and the decoder-norm constraint.

Adam with beta1 = 0 has no first moment, so `scale_by_adam_without_momentum` keeps only
the second moment: the same update as optax.adam(b1=0) with a third less optimiser
memory, which matters for 2^20-wide SAEs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class SecondMomentState(NamedTuple):
    count: jax.Array
    nu: optax.Params


def scale_by_adam_without_momentum(b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """g / (sqrt(nu / (1 - b2^t)) + eps), nu an EMA of g^2: Adam's update when beta1 = 0."""

    def init(params):
        return SecondMomentState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        count = state.count + 1
        nu = jax.tree.map(lambda n, g: b2 * n + (1.0 - b2) * g * g, state.nu, grads)
        correction = 1.0 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(lambda g, n: g / (jnp.sqrt(n / correction) + eps), grads, nu)
        return updates, SecondMomentState(count, nu)

    return optax.GradientTransformation(init, update)


def warmup_schedule(peak: float, warmup_steps: int, total_steps: int, decay: str) -> optax.Schedule:
    """Cosine warm-up from 0.1 * peak to peak over `warmup_steps`, then constant or cosine decay."""

    def schedule(count):
        t = count.astype(jnp.float32)
        warm = peak * (0.1 + 0.9 * 0.5 * (1.0 - jnp.cos(jnp.pi * jnp.minimum(t / max(warmup_steps, 1), 1.0))))
        if decay == "none":
            return warm
        span = max(total_steps - warmup_steps, 1)
        progress = jnp.clip((t - warmup_steps) / span, 0.0, 1.0)
        return jnp.where(t < warmup_steps, warm, peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def sparsity_schedule(warmup_steps: int):
    """Linear warm-up of the sparsity coefficient from 0 over `warmup_steps`: a factor in [0, 1]."""

    def factor(count):
        return jnp.minimum(count.astype(jnp.float32) / max(warmup_steps, 1), 1.0)

    return factor


def make_optimizer(lr: optax.Schedule, threshold_lr: optax.Schedule, b2: float, eps: float,
                   labels) -> optax.GradientTransformation:
    """Adam(beta1=0) with its own learning rate for log-thresholds (`labels` marks them)."""
    def adam(schedule):
        return optax.chain(scale_by_adam_without_momentum(b2, eps), optax.scale_by_learning_rate(schedule))

    return optax.multi_transform({"main": adam(lr), "threshold": adam(threshold_lr)}, labels)


def remove_parallel_component(grad_W_dec: jax.Array, W_dec: jax.Array) -> jax.Array:
    """Drop the part of each decoder row's gradient along the row (rows have unit norm)."""
    return grad_W_dec - jnp.sum(grad_W_dec * W_dec, axis=-1, keepdims=True) * W_dec


def unit_rows(W_dec: jax.Array) -> jax.Array:
    return W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
