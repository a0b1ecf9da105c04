"""The sparse-aware training step: work in proportion to the active latents, not the width.

The encoder matmul stays dense: every pre-activation must be known to find the active
ones. Everything after it needs only the (row, latent) pairs with pre > theta - eps
(the active latents and the straight-through band around each threshold; a full
bandwidth below theta, so rounding at the band's edge never drops a pair): the decoder
pass, the latent gradient, both weight gradients, and the threshold and bias gradients.
Each step lists those pairs (`select`, which also counts them) and takes the sparse
branch when every row's pairs fit `capacity` (= train.sparse_max_density x width), the
dense one otherwise, inside one compiled program (`lax.cond`); both give the same
values and gradients.

JumpReLU transcoders (SPEC.md 5) take the same step with their target y: the kernels'
inputs are then x itself (no pre-encoder bias) and their errors y_hat - y. Target-L0
JumpReLU SAEs and transcoders take it with their rule's penalty (`pairs_value_and_grad`).

The kernels of `sparse_kernels` run on the host through `host_call`, so the sparse
branch serves a single CPU device (a host training one job); with a GPU, TPU or a
sharded mesh every step is dense.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gemmascope.config import TrainConfig
from gemmascope.train.host_call import host_call, register
from gemmascope.train.jumprelu import (
    JumpReLUParams,
    Outputs,
    dense_value_and_grad,
    encode_pre_matmul,
    output_offset,
    rectangle,
    wiring_grads,
)


def sparse_available(mesh: Mesh, config: TrainConfig) -> bool:
    """Whether this job's steps may take the sparse branch."""
    return (config.sparse_max_density > 0 and config.matmul_dtype == "float32" and mesh.size == 1
            and mesh.devices.flat[0].platform == "cpu")


def capacity(width: int, config: TrainConfig) -> int:
    return max(1, int(width * config.sparse_max_density))


# XLA may run the callbacks of a group's SAEs on two threads at once; numba's default
# threading layer aborts the process on concurrent parallel launches, so they take turns
# (each one already uses every core).
_KERNEL_LOCK = threading.Lock()


def _taking_turns(kernel_name: str):
    def run(*arrays: np.ndarray) -> None:
        from gemmascope.train import sparse_kernels

        with _KERNEL_LOCK:
            getattr(sparse_kernels, kernel_name)(*arrays)

    run.__name__ = kernel_name
    return run


def run_kernel(kernel_name: str, results: list[jax.ShapeDtypeStruct], *args) -> list[jax.Array]:
    """Run a `sparse_kernels` kernel on XLA's buffers; `results` its outputs' shapes."""
    register(kernel_name, _taking_turns(kernel_name))
    return host_call(kernel_name, results, *args)


def value_and_grad(params: JumpReLUParams, x: jax.Array, sparsity: jax.Array, bandwidth: float,
                   matmul_dtype: str, slots: int | None, y: jax.Array | None = None
                   ) -> tuple[jax.Array, Outputs, JumpReLUParams, jax.Array]:
    """(loss, diagnostics, gradients, whether the sparse path ran) of one SAE on normalised
    x, or with a target `y` of one JumpReLU (skip) transcoder from x to y."""
    pre = encode_pre_matmul(params, x, matmul_dtype, transcoder=y is not None)
    dense = partial(dense_value_and_grad, bandwidth=bandwidth, matmul_dtype=matmul_dtype, y=y)
    if slots is None:
        return *dense(params, x, sparsity, pre), jnp.zeros((), bool)
    chosen, needed = select(params, pre, bandwidth, slots)
    fits = needed <= slots

    def sparse(p, x, s, pre, chosen):
        loss, outputs, grads, _ = pairs_value_and_grad(p, x, y, pre, chosen, lambda l0, _: (s * l0, {}),
                                                       bandwidth=bandwidth, tail=False)
        return loss, outputs, grads

    return *jax.lax.cond(fits, sparse, lambda p, x, s, pre, _: dense(p, x, s, pre),
                         params, x, sparsity, pre, chosen), fits


def select(params: JumpReLUParams, pre: jax.Array, bandwidth: float, slots: int) -> tuple[jax.Array, jax.Array]:
    """([batch, slots] the latents of each row with pre > theta - bandwidth, -1 after the
    row's last; the most such latents in any row, which may exceed `slots`)."""
    batch = pre.shape[0]
    floor = jnp.exp(params.log_threshold) - bandwidth
    return run_kernel("select", [jax.ShapeDtypeStruct((batch, slots), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)],
                 pre, floor)


def pairs_value_and_grad(params, x: jax.Array, y: jax.Array | None, pre: jax.Array, chosen: jax.Array,
                         penalty: Callable, *, bandwidth: float, tail: bool):
    """(loss, diagnostics, gradients, penalty terms) of a JumpReLU SAE (or, with y, transcoder)
    from its kept pairs `chosen` (`select`'s, which must hold every pair with pre > theta -
    bandwidth).

    `penalty(l0, frequency)` -> (value, named terms) is the sparsity penalty as a function of
    the batch's L0 and each latent's firing frequency [width] (lambda * L0 for Gemma Scope,
    `arch.TargetL0JumpReLU.penalty`); its derivatives w with respect to a pair's activity
    H(pre - theta) reach the thresholds through H's pseudo-derivative: the rectangle kernel
    -(1/eps) K(u) of `jumprelu.step`, and with `tail` also `tail_step`'s -H / max(s, eps) (s
    the latent's mean excess over its active rows): both non-zero only at kept pairs.
    """
    transcoder = y is not None
    target = y if transcoder else x
    batch, width = pre.shape
    d_in, d_out = x.shape[1], target.shape[1]
    slots = chosen.shape[1]
    theta = jnp.exp(params.log_threshold)
    valid = chosen >= 0
    index = jnp.where(valid, chosen, 0)
    pre_k, theta_k = jnp.take_along_axis(pre, index, axis=1), theta[index]
    active_k = valid & (pre_k > theta_k)
    f_k = jnp.where(active_k, pre_k, 0.0)

    diff = decode_pairs(params.W_dec, chosen, f_k) + output_offset(params, x) - target
    error = jnp.sum(diff * diff, axis=-1)
    g_xhat = (2.0 / batch) * diff
    l0 = jnp.sum(active_k, dtype=jnp.float32) / batch
    counts = scatter_latents(width, chosen, active_k.astype(jnp.float32))  # dropped if `penalty` ignores it
    (value, terms), (d_l0, d_frequency) = jax.value_and_grad(penalty, argnums=(0, 1), has_aux=True)(l0, counts / batch)
    loss = jnp.mean(error) + value
    outputs = pairs_outputs(target, loss, error, chosen, active_k, width)
    pair_weight = (d_l0 + d_frequency) / batch  # [width] dL/dH(pre - theta) at each of a latent's rows

    d_f_k, d_W_dec, d_W_enc = run_kernel("backward", [jax.ShapeDtypeStruct((batch, slots), jnp.float32),
                                                 jax.ShapeDtypeStruct((width, d_out), jnp.float32),
                                                 jax.ShapeDtypeStruct((d_in, width), jnp.float32)],
                                    chosen, f_k, g_xhat, x if transcoder else x - params.b_dec, params.W_dec)
    band_k = valid * rectangle((pre_k - theta_k) / bandwidth)
    d_theta = -(1.0 / bandwidth) * scatter_latents(width, chosen, band_k * (theta_k * d_f_k + pair_weight[index]))
    if tail:
        excess = scatter_latents(width, chosen, jnp.where(active_k, pre_k - theta_k, 0.0))
        mean_excess = excess / jnp.maximum(counts, 1.0)
        d_theta = d_theta - pair_weight * counts / jnp.maximum(mean_excess, bandwidth)
    d_b_enc = scatter_latents(width, chosen, jnp.where(active_k, d_f_k, 0.0))
    grads = wiring_grads(params, x, g_xhat, transcoder, W_enc=d_W_enc, b_enc=d_b_enc, W_dec=d_W_dec,
                         log_threshold=d_theta * theta)
    return loss, outputs, grads, terms


# The pieces every sparse step shares, whatever picks its kept (row, latent) pairs:
# `chosen` [batch, slots] holds each row's kept latents, -1 in empty slots.

def decode_pairs(W_dec: jax.Array, chosen: jax.Array, f_k: jax.Array) -> jax.Array:
    """[batch, d_in] each row's sum of f_k W_dec[latent] over its kept pairs (no bias)."""
    rows = jax.ShapeDtypeStruct((chosen.shape[0], W_dec.shape[1]), jnp.float32)
    return run_kernel("decode", [rows], chosen, f_k, W_dec)[0]


def scatter_latents(width: int, chosen: jax.Array, values: jax.Array) -> jax.Array:
    """[width] the sum of `values` [batch, slots] over the pairs of each latent (empty
    slots must hold 0: they add to latent 0)."""
    return jnp.zeros((width,), jnp.float32).at[jnp.maximum(chosen, 0)].add(values)


def pairs_outputs(target: jax.Array, loss: jax.Array, error: jax.Array, chosen: jax.Array, active: jax.Array,
                  width: int) -> Outputs:
    """A sparse step's diagnostics; `active` [batch, slots] marks the kept pairs that fire,
    `target` is what the step reconstructs (x for an SAE)."""
    batch = target.shape[0]
    centred = target - jnp.mean(target, axis=0)
    fired = jnp.zeros((width,), bool).at[jnp.maximum(chosen, 0)].max(active)
    return Outputs(loss, jnp.mean(error), jnp.sum(active, dtype=jnp.float32) / batch, fired,
                   jnp.sum(centred**2), jnp.sum(error))
