"""The AuxK loss of Gao et al. 2024 ("Scaling and evaluating sparse autoencoders").

Dead latents get no gradient under a TopK selection, so they would stay dead. AuxK asks
the dead latents alone to explain what the main reconstruction missed: with the
residual e = y - y_hat and the top `aux_k` pre-activations among dead latents (after
ReLU) f_aux,

    auxk = mean_rows ||e - f_aux @ W_dec||^2

e is held constant (stop_gradient): the auxiliary task trains the dead latents towards
the error, it must not pull the main reconstruction towards making the error easy. No
decoder bias or skip enters e_hat: they are already in y_hat. The term is in the units
of the main squared error (summed over d_out, mean over rows) rather than Gao's
normalised MSE, so `aux_coefficient` (1/32 in the paper) weighs it against `mse`
directly. It is 0 when no latent is dead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Params, squared_error
from gemmascope.train.arch.select import row_topk_mask


def auxk_loss(params: Params, pre: jax.Array, y: jax.Array, y_hat: jax.Array, dead: jax.Array,
              aux_k: int) -> jax.Array:
    """The AuxK term for pre-activations [B, d_sae] and the dead mask [d_sae]."""
    chosen = row_topk_mask(jnp.where(dead, pre, -jnp.inf), min(aux_k, pre.shape[-1])) & dead
    e_hat = jnp.where(chosen, jax.nn.relu(pre), 0.0) @ params.W_dec
    residual = jax.lax.stop_gradient(y - y_hat)
    return jnp.where(jnp.any(dead), jnp.mean(squared_error(residual, e_hat)), 0.0)


def auxk_terms(params: Params, pre: jax.Array, y: jax.Array, y_hat: jax.Array, dead: jax.Array | None,
               aux_k: int, aux_coefficient: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(what AuxK adds to the loss, its metric): nothing without a dead mask."""
    if dead is None:
        return jnp.zeros((), y.dtype), {}
    aux = auxk_loss(params, pre, y, y_hat, dead, aux_k)
    return aux_coefficient * aux, {"auxk": aux}
