"""CPU kernels for the sparse training step (numba, parallel over rows or latents).

After warm-up a JumpReLU SAE's latents are a few percent dense at most, so the decoder
pass and three of the backward products touch only the (row, latent) pairs that are
active or inside the straight-through band. Each kernel takes those pairs as `slots`:
[batch, capacity] latent indices per row, -1 after the row's last one, and does work in
proportion to the pairs, not to batch x width. XLA's CPU scatter runs a weight gradient
written as a scatter-add slower than the dense matmul, hence these kernels:

- `decode`:   out[b] = sum_k values[b, k] * table[slots[b, k]]          (rows in parallel)
- `row_dots`: out[b, k] = vectors[b] . table[slots[b, k]]                (rows in parallel)
- `weight_grads`: both weight gradients, latents^T errors and inputs^T latent gradients,
                  each summed over the pairs of a latent (latents in parallel, each
                  output written once)
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def select(pre: np.ndarray, floor: np.ndarray, capacity: int) -> np.ndarray:
    """Per row, the first `capacity` latents with pre > floor (the rest of the row: -1)."""
    batch, width = pre.shape
    slots = np.full((batch, capacity), -1, np.int32)
    for b in numba.prange(batch):
        count = 0
        for j in range(width):
            if pre[b, j] > floor[j] and count < capacity:
                slots[b, count] = j
                count += 1
    return slots


@numba.njit(parallel=True, fastmath=True, cache=True)
def decode(slots: np.ndarray, values: np.ndarray, table: np.ndarray) -> np.ndarray:
    batch, capacity = slots.shape
    d = table.shape[1]
    out = np.zeros((batch, d), np.float32)
    for b in numba.prange(batch):
        row = out[b]
        for k in range(capacity):
            j = slots[b, k]
            if j < 0:
                break
            value = values[b, k]
            if value != 0.0:
                source = table[j]
                for i in range(d):
                    row[i] += value * source[i]
    return out


@numba.njit(parallel=True, fastmath=True, cache=True)
def row_dots(slots: np.ndarray, vectors: np.ndarray, table: np.ndarray) -> np.ndarray:
    batch, capacity = slots.shape
    d = table.shape[1]
    out = np.zeros((batch, capacity), np.float32)
    for b in numba.prange(batch):
        vector = vectors[b]
        for k in range(capacity):
            j = slots[b, k]
            if j < 0:
                break
            source = table[j]
            total = np.float32(0.0)
            for i in range(d):
                total += vector[i] * source[i]
            out[b, k] = total
    return out


@numba.njit(cache=True)
def _by_latent(slots: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A counting sort of the pairs by latent: (start of each latent's pairs, flat pair ids)."""
    batch, capacity = slots.shape
    starts = np.zeros(width + 1, np.int64)
    for b in range(batch):
        for k in range(capacity):
            j = slots[b, k]
            if j < 0:
                break
            starts[j + 1] += 1
    for j in range(width):
        starts[j + 1] += starts[j]
    fill = starts[:-1].copy()
    pairs = np.empty(starts[width], np.int64)
    for b in range(batch):
        for k in range(capacity):
            j = slots[b, k]
            if j < 0:
                break
            pairs[fill[j]] = b * capacity + k
            fill[j] += 1
    return starts, pairs


BLOCK = 16  # latents per parallel task: one 64-byte cache line of an encoder-gradient row


@numba.njit(parallel=True, fastmath=True, cache=True)
def weight_grads(slots: np.ndarray, latents: np.ndarray, latent_grads: np.ndarray, errors: np.ndarray,
                 inputs: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(decoder gradient [width, d] = latents^T errors, encoder gradient [d, width] = inputs^T latent_grads).

    Latents in parallel, in blocks of BLOCK, over a by-latent index of the pairs: each
    decoder-gradient row is written once by one thread, and each block's encoder-gradient
    columns are gathered in a small buffer and written as whole cache lines, so no
    [width, d] transpose is needed afterwards.
    """
    capacity = slots.shape[1]
    d = inputs.shape[1]
    starts, pairs = _by_latent(slots, width)
    latent_flat, grad_flat = latents.ravel(), latent_grads.ravel()
    decoder = np.empty((width, d), np.float32)
    encoder = np.empty((d, width), np.float32)
    for block_index in numba.prange((width + BLOCK - 1) // BLOCK):
        first = block_index * BLOCK
        count = min(BLOCK, width - first)
        columns = np.zeros((d, BLOCK), np.float32)
        column = np.empty(d, np.float32)
        for c in range(count):
            j = first + c
            row = decoder[j]
            row[:] = 0.0
            column[:] = 0.0
            for p in range(starts[j], starts[j + 1]):
                pair = pairs[p]
                b = pair // capacity
                value = latent_flat[pair]
                if value != 0.0:
                    error = errors[b]
                    for i in range(d):
                        row[i] += value * error[i]
                grad = grad_flat[pair]
                if grad != 0.0:
                    source = inputs[b]
                    for i in range(d):
                        column[i] += grad * source[i]
            for i in range(d):
                columns[i, c] = column[i]
        for i in range(d):
            for c in range(count):
                encoder[i, first + c] = columns[i, c]
    return decoder, encoder
