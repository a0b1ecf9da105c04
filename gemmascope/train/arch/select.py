"""Top-k selections as boolean masks.

Masks are built by scattering `lax.top_k` indices, so exactly k entries are kept even
when values tie, and the latents are then `where(mask, relu(pre), 0)`: the gradient
passes straight to the kept, positive pre-activations and nowhere else, with no
custom_vjp (the indices carry no gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """[B, d] bool: True at the k largest scores of each row."""
    _, index = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.zeros(scores.shape, bool).at[rows, index].set(True)


def batch_topk_mask(scores: jax.Array, n_keep: int) -> jax.Array:
    """[B, d] bool: True at the n_keep largest scores of the whole batch."""
    _, index = jax.lax.top_k(jax.lax.stop_gradient(scores).reshape(-1), n_keep)
    return jnp.zeros(scores.size, bool).at[index].set(True).reshape(scores.shape)
