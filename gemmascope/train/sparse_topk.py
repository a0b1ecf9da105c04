"""The sparse TopK and BatchTopK training steps: every pass but the encoder matmul in
proportion to the kept latents.

A TopK SAE (`arch.TopK`) keeps exactly k latents per row, and a BatchTopK SAE
(`arch.BatchTopK`) the batch's B x k largest activations, k per row on average; after
the dense encoder matmul either step is a sparse one by construction. The kept (row,
latent) pairs (`sparse_kernels.top_k`, `sparse_kernels.batch_top_k`) drive the decoder
pass, the latent gradients and both weight gradients through the kernels of the sparse
JumpReLU step. AuxK's pairs, the top aux_k pre-activations of each row among the dead
latents, go through the same kernels: the backward pass walks the main rows and the
auxiliary rows (each with its own error) as one list, so both weight gradients are
written once. When no latent is dead the auxiliary half is skipped (`lax.cond`).

A Matryoshka BatchTopK SAE (`arch.MatryoshkaBatchTopK`) keeps the BatchTopK pairs and
reconstructs from each nested prefix of the dictionary. Its pairs are split by the
prefix block of their latent into one row per block (a row lists its latents in
increasing order, so a block's pairs are one run of it): one decode of those rows gives
each block's part of x_hat, their cumulative sums every prefix's reconstruction, and a
pair of block i takes as its error the sum of the errors of the prefixes that contain
it (a reverse cumulative sum), so the backward pass is one walk of the same pairs.

A BatchTopK row may keep more latents than k; the group step takes the dense path for a
batch whose busiest row overflows the sparse capacity, as for JumpReLU. Values and
gradients equal `jax.value_and_grad` of `arch.sae_loss` (tests/test_sparse_topk.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Params
from gemmascope.train.jumprelu import Outputs, decoder_bias_grad, encode_pre_matmul
from gemmascope.train.sparse import (
    decode_pairs,
    pairs_outputs,
    run_kernel,
    scatter_latents,
)


def topk_pairs(params: Params, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pre-activations, [batch, k] each row's k largest, their latents relu(pre))."""
    pre = encode_pre_matmul(params, x, "float32")
    return (pre, *_row_pairs(pre, jnp.ones(pre.shape[1:], bool), k))


def batch_topk_pairs(pre: jax.Array, k: int, capacity: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """([batch, capacity] each row's kept latents under the batch rule, -1 after its last,
    their latents relu(pre), the most any row keeps (which may exceed the capacity), the
    smallest kept activation), from the pre-activations: the caller encodes, so a batch
    that overflows the capacity continues from the same encoder matmul on the dense path."""
    batch = pre.shape[0]
    chosen, most, kept_minimum = run_kernel(
        "batch_top_k", [jax.ShapeDtypeStruct((batch, capacity), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
                        jax.ShapeDtypeStruct((), jnp.float32)], pre, jnp.asarray(batch * k, jnp.int32))
    return chosen, _values(pre, chosen), most, kept_minimum


def value_and_grad(params: Params, x: jax.Array, pre: jax.Array, chosen: jax.Array, f_k: jax.Array, aux_k: int,
                   aux_coefficient: float, dead: jax.Array, prefixes: tuple[int, ...] = ()
                   ) -> tuple[jax.Array, Outputs, Params, dict[str, jax.Array]]:
    """(loss, diagnostics, gradients, {"auxk": the AuxK term}) of an SAE on normalised x
    [batch, d_in] whose kept latents are `chosen` [batch, slots] (-1 in empty slots)
    with values `f_k` (0 there), with `dead` [width] the latents AuxK may use. With
    `prefixes` (a Matryoshka SAE's nested sizes, the last the width; `chosen` in
    increasing latent order within each row) the loss is the mean of every prefix's
    error, and the terms hold "prefix_mse" too."""
    batch, d_in = x.shape
    width = params.b_enc.shape[0]
    slots = chosen.shape[1]
    blocks = len(prefixes) or 1
    block_chosen, block_f = _split_by_prefix(chosen, f_k, prefixes) if prefixes else (chosen, f_k)
    parts = decode_pairs(params.W_dec, block_chosen, block_f).reshape(blocks, batch, d_in)
    # Each prefix's x_hat - x, and a block's error: its pairs feed every prefix from
    # theirs on, so the sum of those prefixes' differences (running sums over the few
    # blocks, written out: XLA fuses them where a cumsum would scan).
    diffs = [parts[0] + params.b_dec - x]
    for part in parts[1:]:
        diffs.append(diffs[-1] + part)
    g_blocks = [diffs[-1]]
    for prefix_diff in reversed(diffs[:-1]):
        g_blocks.insert(0, g_blocks[0] + prefix_diff)
    prefix_error = jnp.stack([jnp.sum(d * d, axis=-1) for d in diffs])
    diff, error = diffs[-1], prefix_error[-1]
    errors = (2.0 / (blocks * batch)) * jnp.concatenate(g_blocks)
    encoder_input = x - params.b_dec
    inputs = jnp.tile(encoder_input, (blocks, 1))
    weight_grads = [jax.ShapeDtypeStruct((width, d_in), jnp.float32), jax.ShapeDtypeStruct((d_in, width), jnp.float32)]
    aux_slots = min(aux_k, width)

    def without_aux():
        dots, d_W_dec, d_W_enc = run_kernel(
            "backward", [jax.ShapeDtypeStruct((blocks * batch, slots), jnp.float32), *weight_grads],
            block_chosen, block_f, errors, inputs, params.W_dec)
        return (jnp.zeros((), jnp.float32), dots, jnp.full((batch, aux_slots), -1, jnp.int32),
                jnp.zeros((batch, aux_slots), jnp.float32), jnp.zeros((batch, aux_slots), jnp.float32),
                d_W_dec, d_W_enc)

    def with_aux():
        aux_chosen, f_aux = _row_pairs(pre, dead, aux_slots)
        e_hat = decode_pairs(params.W_dec, aux_chosen, f_aux)
        aux_diff = e_hat + diff  # e_hat - (x - x_hat), the residual held constant
        aux = jnp.mean(jnp.sum(aux_diff * aux_diff, axis=-1))
        capacity = max(slots, aux_slots)
        rows = blocks * batch
        both = jnp.concatenate([_widen(block_chosen, capacity, -1), _widen(aux_chosen, capacity, -1)])
        latents = jnp.concatenate([_widen(block_f, capacity, 0.0), _widen(f_aux, capacity, 0.0)])
        dots, d_W_dec, d_W_enc = run_kernel(
            "backward", [jax.ShapeDtypeStruct((rows + batch, capacity), jnp.float32), *weight_grads],
            both, latents, jnp.concatenate([errors, (2.0 * aux_coefficient / batch) * aux_diff]),
            jnp.concatenate([inputs, encoder_input]), params.W_dec)
        return aux, dots[:rows, :slots], aux_chosen, f_aux, dots[rows:, :aux_slots], d_W_dec, d_W_enc

    aux, dots, aux_chosen, f_aux, aux_dots, d_W_dec, d_W_enc = jax.lax.cond(jnp.any(dead), with_aux, without_aux)
    d_b_enc = (scatter_latents(width, block_chosen, jnp.where(block_f > 0, dots, 0.0))
               + scatter_latents(width, aux_chosen, jnp.where(f_aux > 0, aux_dots, 0.0)))
    # The first block's error is every prefix's: b_dec is in all of them.
    grads = params._replace(W_enc=d_W_enc, b_enc=d_b_enc, W_dec=d_W_dec,
                            b_dec=decoder_bias_grad(params, errors[:batch], d_b_enc))
    prefix_mse = jnp.mean(prefix_error, axis=1)
    loss = jnp.mean(prefix_mse) + aux_coefficient * aux
    terms = {"auxk": aux, "prefix_mse": prefix_mse} if prefixes else {"auxk": aux}
    return loss, pairs_outputs(x, loss, error, chosen, f_k > 0, width), grads, terms


def _split_by_prefix(chosen: jax.Array, f_k: jax.Array, prefixes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """[blocks * batch, slots] the pairs of each prefix block [prefixes[i-1], prefixes[i])
    as rows of their own, block-major, each moved to the front of its row (-1 and 0
    after). A row's latents are in increasing order, so a block's pairs are one run."""
    slots = chosen.shape[1]
    slot = jnp.arange(slots)
    listed = chosen >= 0
    block_chosen, block_f, start = [], [], 0
    for end in prefixes:
        first = jnp.sum(listed & (chosen < start), axis=1, keepdims=True)
        count = jnp.sum(listed & (chosen >= start) & (chosen < end), axis=1, keepdims=True)
        index, inside = jnp.minimum(first + slot, slots - 1), slot < count
        block_chosen.append(jnp.where(inside, jnp.take_along_axis(chosen, index, axis=1), -1))
        block_f.append(jnp.where(inside, jnp.take_along_axis(f_k, index, axis=1), 0.0))
        start = end
    return jnp.concatenate(block_chosen), jnp.concatenate(block_f)


def _row_pairs(pre: jax.Array, allowed: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """([batch, k] each row's k largest pre-activations among `allowed` latents, -1 where
    fewer are allowed; their latents relu(pre), 0 in empty slots)."""
    chosen = run_kernel("top_k", [jax.ShapeDtypeStruct((pre.shape[0], k), jnp.int32)], pre, allowed)[0]
    return chosen, _values(pre, chosen)


def _values(pre: jax.Array, chosen: jax.Array) -> jax.Array:
    """relu(pre) at the chosen latents, 0 in empty slots."""
    values = jnp.take_along_axis(pre, jnp.maximum(chosen, 0), axis=1)
    return jnp.where(chosen >= 0, jax.nn.relu(values), 0.0)


def _widen(array: jax.Array, columns: int, fill) -> jax.Array:
    """`array` [rows, c] padded on the right with `fill` to [rows, columns]."""
    return jnp.pad(array, ((0, 0), (0, columns - array.shape[1])), constant_values=fill)
