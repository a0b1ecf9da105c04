"""CPU kernels for the sparse training step (numba, parallel over latents).

After warm-up a JumpReLU SAE's latents are a few percent dense at most, so the decoder
pass and three of the backward products touch only the (row, latent) pairs that are
active or inside the straight-through band. Each kernel takes those pairs as `slots`:
[batch, capacity] latent indices per row, -1 after the row's last one, and does work in
proportion to the pairs, not to batch x width. XLA's CPU scatter runs a weight gradient
written as a scatter-add slower than the dense matmul, hence these kernels:

- `select`:   each row's pairs, and the most pairs in any row
- `top_k`:    each row's k largest scores among allowed latents (TopK and AuxK's pairs)
- `batch_top_k`: the pairs of the batch's n largest positive activations (BatchTopK)
- `decode`:   out[b] = sum_k values[b, k] * table[slots[b, k]]
- `backward`: each pair's latent gradient errors[b] . table[slots[b, k]], and both
  weight gradients, latents^T errors and inputs^T latent gradients

`decode` and `backward` walk the pairs latent by latent (a counting sort of each
chunk's pairs), over chunks of CHUNK rows: each row of the [width, d] table or gradient
is touched once per chunk, while the chunk's [CHUNK, d] row vectors stay in the
last-level cache. Walking row by row instead gathers a table row from memory for every
pair, 2-4x slower here.
"""

from __future__ import annotations

import numba
import numpy as np

CHUNK = 1024  # rows per chunk: 1024 x 2304 float32 = 9.4 MB, inside a 32 MB L3
BLOCK = 16  # latents per task of backward: one 64-byte cache line of an encoder-gradient row


@numba.njit(cache=True)
def _listed(row, count, latent):
    """A row's slots after its count-th latent: stored while the row has room, counted
    either way (the caller learns that the row overflowed); the new count."""
    if count < row.size:
        row[count] = latent
    return count + 1


@numba.njit(cache=True)
def _closed(row, count):
    """-1 in the slots after the row's last latent; the count."""
    for k in range(min(count, row.size), row.size):
        row[k] = -1
    return count


@numba.njit(parallel=True, cache=True)
def _select(pre, floor, slots, counts):
    batch, width = pre.shape
    for b in numba.prange(batch):
        count = 0
        for j in range(width):
            if pre[b, j] > floor[j]:
                count = _listed(slots[b], count, j)
        counts[b] = _closed(slots[b], count)


def select(pre: np.ndarray, floor: np.ndarray, slots: np.ndarray, most: np.ndarray) -> None:
    """Writes each row's first slots.shape[1] latents with pre > floor into `slots`
    (-1 after its last), and into the scalar `most` the largest number of such latents
    in any row, which may exceed the capacity."""
    counts = np.empty(pre.shape[0], np.int64)
    _select(pre, floor, slots, counts)
    most[()] = counts.max(initial=0)


@numba.njit(cache=True)
def _below(values, indices, a, b):
    """Heap order of `top_k`: a smaller value, or the same value at a later latent (which
    leaves first, so ties keep the earlier latent, as `lax.top_k` does)."""
    return values[a] < values[b] or (values[a] == values[b] and indices[a] > indices[b])


@numba.njit(cache=True)
def _sift_down(values, indices, size):
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and _below(values, indices, child + 1, child):
            child += 1
        if not _below(values, indices, child, i):
            return
        values[i], values[child] = values[child], values[i]
        indices[i], indices[child] = indices[child], indices[i]
        i = child


@numba.njit(parallel=True, cache=True)
def top_k(scores: np.ndarray, allowed: np.ndarray, slots: np.ndarray) -> None:
    """Writes into slots[b] the latents of the slots.shape[1] largest scores[b, j] with
    allowed[j] (ties to the earlier latent), -1 after the last where fewer are allowed.

    A min-heap of the k best so far per row: one pass over the row, and O(log k) work
    only when a score beats the heap's smallest, a few hundred times a row for k = 32
    at width 16,384 on scores in random order."""
    batch, width = scores.shape
    k = slots.shape[1]
    for b in numba.prange(batch):
        values = np.empty(k, np.float32)
        indices = slots[b]
        size = 0
        row = scores[b]
        for j in range(width):
            if not allowed[j]:
                continue
            value = row[j]
            if size < k:
                i = size  # sift up: a new latent is later than all in the heap
                size += 1
                values[i] = value
                indices[i] = j
                while i > 0:
                    parent = (i - 1) // 2
                    if not _below(values, indices, i, parent):
                        break
                    values[i], values[parent] = values[parent], values[i]
                    indices[i], indices[parent] = indices[parent], indices[i]
                    i = parent
            elif value > values[0]:
                values[0] = value
                indices[0] = j
                _sift_down(values, indices, size)
        for i in range(size, k):
            indices[i] = -1


RADIX = 16  # bits of a float32's key resolved per histogram pass of batch_top_k


@numba.njit(cache=True)
def _key(bits) -> np.int64:
    """An order-preserving integer key of relu(value) from value's float32 bits viewed as
    int32: the bits themselves for a positive value, 0 for zero and negative ones (whose
    sign bit makes the int32 negative)."""
    return np.int64(bits) if bits > 0 else np.int64(0)


@numba.njit(parallel=True, cache=True)
def _key_histogram(bits, high, shift, parts):
    """Histogram of (key >> shift) & 0xFFFF over the keys whose higher bits are `high`
    (every key when shift is 16), counted per task and summed."""
    batch, width = bits.shape
    counts = np.zeros((parts, 1 << RADIX), np.int64)
    for t in numba.prange(parts):
        for b in range(t * batch // parts, (t + 1) * batch // parts):
            for j in range(width):
                key = _key(bits[b, j])
                if shift == 0 and key >> RADIX != high:
                    continue
                counts[t, (key >> shift) & 0xFFFF] += 1
    return counts.sum(axis=0)


@numba.njit(cache=True)
def _bin_of_rank(histogram, wanted):
    """(the bin holding the `wanted`-th largest key, how many keys lie in higher bins)."""
    above = 0
    for value in range(histogram.size - 1, -1, -1):
        if above + histogram[value] >= wanted:
            return value, above
        above += histogram[value]
    return 0, above


@numba.njit(parallel=True, cache=True)
def _batch_slots(bits, threshold, tie_budget, slots, counts):
    batch, width = bits.shape
    for b in numba.prange(batch):
        count = 0
        ties = tie_budget[b]
        for j in range(width):
            key = _key(bits[b, j])
            if key > threshold or (key == threshold and ties > 0 and key > 0):
                if key == threshold:
                    ties -= 1
                count = _listed(slots[b], count, j)
        counts[b] = _closed(slots[b], count)


@numba.njit(parallel=True, cache=True)
def _tie_counts(bits, threshold):
    batch, width = bits.shape
    ties = np.zeros(batch, np.int64)
    for b in numba.prange(batch):
        for j in range(width):
            if _key(bits[b, j]) == threshold:
                ties[b] += 1
    return ties


@numba.njit(parallel=True, cache=True)
def _smallest_positive(pre):
    batch, width = pre.shape
    smallest = np.full(batch, np.inf, np.float32)
    for b in numba.prange(batch):
        for j in range(width):
            value = pre[b, j]
            if 0 < value < smallest[b]:
                smallest[b] = value
    return smallest.min()


def batch_top_k(pre: np.ndarray, keep: np.ndarray, slots: np.ndarray, most: np.ndarray,
                kept_minimum: np.ndarray) -> None:
    """The batch rule of BatchTopK: of relu(pre) over the whole batch, the `keep` largest
    (ties to the earlier row and latent, as `lax.top_k` of the flattened batch), and of
    those the positive ones, as each row's pairs: written into `slots` as `select` does
    (its first slots.shape[1] latents, -1 after; `most` the largest count of any row,
    which may exceed the capacity); `kept_minimum` the smallest kept activation (inf
    when none is positive).

    The keep-th largest value is found exactly by a radix select on the float bits of
    relu(pre), which order as integers: one histogram of the high 16 bits over the
    batch, one of the low 16 within the chosen high bin, then one pass listing the pairs.
    """
    wanted = int(keep[()])
    bits = pre.view(np.int32)
    parts = max(1, min(pre.shape[0], 4 * numba.get_num_threads()))
    high, above = _bin_of_rank(_key_histogram(bits, 0, RADIX, parts), wanted)
    lows = _key_histogram(bits, high, 0, parts)
    low, above_low = _bin_of_rank(lows, wanted - above)
    threshold = (high << RADIX) | low
    if threshold > 0:
        needed = wanted - above - above_low  # of the keys equal to the threshold, in row order
        if lows[low] > needed:  # some ties are left out: each row's share, in row order
            ties = _tie_counts(bits, threshold)
            budget = np.clip(needed - (np.cumsum(ties) - ties), 0, ties)
        else:  # every one is kept (the usual case): no counting pass
            budget = np.full(pre.shape[0], pre.shape[1], np.int64)
        kept_minimum[()] = np.array(threshold, np.int32).view(np.float32)
    else:  # fewer positive activations than `keep`: every one is kept
        budget = np.zeros(pre.shape[0], np.int64)
        kept_minimum[()] = _smallest_positive(pre)
    counts = np.empty(pre.shape[0], np.int64)
    _batch_slots(bits, threshold, budget, slots, counts)
    most[()] = counts.max(initial=0)


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



@numba.njit(parallel=True, fastmath=True, cache=True)
def _decode(slots, values, table, out, parts):
    batch, capacity = slots.shape
    width, d = table.shape
    partial = np.empty((parts, CHUNK, d), np.float32)  # one accumulator per task: no shared writes
    for first in range(0, batch, CHUNK):
        rows = min(CHUNK, batch - first)
        starts, pairs = _by_latent(slots[first:first + rows], width)
        for t in numba.prange(parts):
            acc = partial[t]
            acc[:rows] = 0.0
            for j in range(t * width // parts, (t + 1) * width // parts):
                source = table[j]
                for p in range(starts[j], starts[j + 1]):
                    pair = pairs[p]
                    b = pair // capacity
                    value = values[first + b, pair - b * capacity]
                    if value != 0.0:
                        row = acc[b]
                        for i in range(d):
                            row[i] += value * source[i]
        for b in numba.prange(rows):
            row = out[first + b]
            row[:] = partial[0, b]
            for t in range(1, parts):
                other = partial[t, b]
                for i in range(d):
                    row[i] += other[i]


def decode(slots: np.ndarray, values: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """Writes sum_k values[b, k] * table[slots[b, k]] into out[b]."""
    _decode(slots, values, table, out, numba.get_num_threads())


@numba.njit(parallel=True, fastmath=True, cache=True)
def backward(slots: np.ndarray, latents: np.ndarray, errors: np.ndarray, inputs: np.ndarray, table: np.ndarray,
             dots: np.ndarray, decoder: np.ndarray, encoder: np.ndarray) -> None:
    """Writes the latent gradients dots [batch, capacity] = errors . table rows (0 in
    empty slots), the decoder gradient [width, d_out] = latents^T errors, and the encoder
    gradient [d_in, width] = inputs^T (latent gradients where the latent is active, i.e.
    its value is non-zero). An SAE's inputs and errors share d; a transcoder's need not.

    One walk of the pairs serves all three: each pair's error row, read once, gives
    its latent gradient and its decoder-gradient term. Latents in parallel, in blocks of
    BLOCK; each block walks every chunk's pairs, adding to its decoder rows in place and
    to its encoder columns in a [BLOCK, d] buffer that stays in the core's cache,
    written out once as whole cache lines of the [d, width] gradient. (Adding each
    chunk's columns to the gradient instead touched every one of its pages once per
    chunk: twice the time.)
    """
    batch, capacity = slots.shape
    width, d = table.shape
    d_in = inputs.shape[1]
    chunks = (batch + CHUNK - 1) // CHUNK
    starts = np.empty((chunks, width + 1), np.int64)
    pairs = np.empty((chunks, CHUNK * capacity), np.int64)
    for c in numba.prange(chunks):
        first = c * CHUNK
        chunk_starts, chunk_pairs = _by_latent(slots[first:first + CHUNK], width)
        starts[c] = chunk_starts
        pairs[c, :chunk_pairs.size] = chunk_pairs
    for b in numba.prange(batch):
        dots[b] = 0.0
    for block_index in numba.prange((width + BLOCK - 1) // BLOCK):
        j0 = block_index * BLOCK
        count = min(BLOCK, width - j0)
        columns = np.zeros((BLOCK, d_in), np.float32)
        decoder[j0:j0 + count] = 0.0
        for c in range(chunks):
            first = c * CHUNK
            for offset in range(count):
                j = j0 + offset
                weights = table[j]
                row = decoder[j]
                column = columns[offset]
                for p in range(starts[c, j], starts[c, j + 1]):
                    pair = pairs[c, p]
                    b = first + pair // capacity
                    k = pair % capacity
                    error = errors[b]
                    dot = np.float32(0.0)
                    for i in range(d):
                        dot += error[i] * weights[i]
                    dots[b, k] = dot
                    value = latents[b, k]
                    if value != 0.0:
                        source = inputs[b]
                        if d_in == d:  # one pass for both (an SAE): ~5% faster than two
                            for i in range(d):
                                row[i] += value * error[i]
                                column[i] += dot * source[i]
                        else:
                            for i in range(d):
                                row[i] += value * error[i]
                            for i in range(d_in):
                                column[i] += dot * source[i]
        for i in range(d_in):
            for offset in range(count):
                encoder[i, j0 + offset] = columns[offset, i]
