"""What every architecture shares: the parameter container, the diagnostics, the decoder.

An architecture is a *rule* (how pre-activations become latents, and which penalty the
loss adds) applied inside a *wiring* (`wiring.py`: an SAE reconstructs its input, a
transcoder predicts a target). A rule sees the wiring only through `offset`, the part
of the output that does not come from the latents: b_dec for an SAE, b_dec + x @ W_skip
for a skip transcoder. Keeping the offset separate from the latent term lets
Matryoshka decode nested prefixes of the dictionary with one matmul per block.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp


class Params(NamedTuple):
    """The parameters of any architecture, named like `jumprelu.JumpReLUParams`.

    The field names are what the rest of the trainer keys on (mesh shardings, release
    reparameterisation), so a JumpReLU SAE in this container is interchangeable with a
    `JumpReLUParams` and the rules accept either. The optional fields are None (an
    empty pytree node) when an architecture has no such parameter.
    """

    W_enc: jax.Array  # [d_in, d_sae]
    b_enc: jax.Array  # [d_sae]
    W_dec: jax.Array  # [d_sae, d_out], unit-norm rows
    b_dec: jax.Array  # [d_out]
    log_threshold: jax.Array | None = None  # [d_sae]; JumpReLU rules only
    W_skip: jax.Array | None = None  # [d_in, d_out]; skip transcoders only


class Outputs(NamedTuple):
    """`jumprelu.Outputs` plus the latents, the reconstruction and the rule's own terms."""

    loss: jax.Array  # the training loss (what is differentiated)
    mse: jax.Array  # mean over the batch of ||y - y_hat||^2 (summed over d_out)
    l0: jax.Array  # mean active latents per row
    fired: jax.Array  # [d_sae] bool: latent active on some row of the batch
    total_variance: jax.Array  # sum over the batch of ||y - mean(y)||^2 (FVU denominator)
    error_sum: jax.Array  # sum over the batch of ||y - y_hat||^2 (FVU numerator)
    latents: jax.Array  # [batch, d_sae] f
    reconstruction: jax.Array  # [batch, d_out] y_hat
    terms: dict[str, jax.Array]  # named parts of the loss and rule statistics, for metrics


class Rule(Protocol):
    """An encoder nonlinearity with its sparsity penalty (a frozen dataclass of knobs)."""

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        """(loss, outputs) from pre-activations [B, d_sae], the output offset [B or 1, d_out],
        the target y [B, d_out] and the trainer's dead-latent mask [d_sae] (or None)."""


def squared_error(y: jax.Array, y_hat: jax.Array) -> jax.Array:
    """||y - y_hat||^2 per row."""
    return jnp.sum((y - y_hat) ** 2, axis=-1)


def reconstruct(params: Params, f: jax.Array, offset: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(y_hat, mean squared error) of latents f: y_hat = f @ W_dec + offset."""
    y_hat = f @ params.W_dec + offset
    return y_hat, jnp.mean(squared_error(y, y_hat))


def summarise(loss: jax.Array, y: jax.Array, y_hat: jax.Array, f: jax.Array, active: jax.Array,
              terms: dict[str, jax.Array]) -> Outputs:
    """The diagnostics of a step; only `loss` carries gradients."""
    error = squared_error(y, y_hat)
    centred = y - jnp.mean(y, axis=0)
    stop = jax.lax.stop_gradient
    return Outputs(
        loss=loss,
        mse=stop(jnp.mean(error)),
        l0=stop(jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.float32))),
        fired=stop(jnp.any(active, axis=0)),
        total_variance=stop(jnp.sum(centred**2)),
        error_sum=stop(jnp.sum(error)),
        latents=stop(f),
        reconstruction=stop(y_hat),
        terms={name: stop(value) for name, value in terms.items()},
    )


def threshold(params: Params) -> jax.Array:
    """theta = exp(log_threshold), with a clear error for params made without thresholds."""
    if params.log_threshold is None:
        raise ValueError("a JumpReLU rule needs params with log_threshold (init with a threshold)")
    return jnp.exp(params.log_threshold)
