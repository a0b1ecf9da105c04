"""The normalisation scalar C of SPEC.md section 2: E||x / C||^2 = 1 over the training rows.

Estimated from a seeded random sample of blocks (whole blocks: reads stay cheap); the
sample size and norm statistics are recorded with the job, including how far the largest
norms are from the median, because a few massive-norm tokens can dominate C.

A transcoder's target is divided by its input's C (SPEC.md 5), so its squared error is
in units of E||y / C||^2, not 1 as an SAE's: recorded as `target_mean_square`, the factor
by which the trainer multiplies a transcoder's sparsity penalties (`group.make_train_step`)
so that a lambda means the same for an SAE and a transcoder.
"""

from __future__ import annotations

import numpy as np

from gemmascope.errors import UserError
from gemmascope.store import ActivationStore


def estimate_scale(store: ActivationStore, site: str, layer: int, *, sample_rows: int, stop_row: int,
                   seed: int, target: str | None = None) -> dict:
    blocks = store.blocks(stop_row)
    order = np.random.default_rng([seed, 7]).permutation(len(blocks))
    chosen, total = [], 0
    for i in order:
        chosen.append(blocks[i])
        total += blocks[i][1] - blocks[i][0]
        if total >= sample_rows:
            break
    rows = np.concatenate(store.read_blocks(site, layer, sorted(chosen))).astype(np.float64)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.any():
        raise UserError(f"{store.url}: {site} layer {layer}: no finite rows in the normalisation sample")
    squared = np.sum(rows[finite] ** 2, axis=1)
    norms = np.sqrt(squared)
    scale = float(np.sqrt(squared.mean()))
    if not scale > 0:
        raise UserError(f"{store.url}: {site} layer {layer}: activations are all zero; cannot normalise")
    median = float(np.median(norms))
    stats = {
        "scale": scale,
        "sample_rows": int(finite.sum()),
        "nonfinite_rows": int((~finite).sum()),
        "mean_norm": float(norms.mean()),
        "median_norm": median,
        "max_norm": float(norms.max()),
        "rows_over_10x_median_norm": int((norms > 10 * median).sum()),
    }
    if target is not None:  # the same tokens' target rows, over the input's C
        targets = np.concatenate(store.read_blocks(target, layer, sorted(chosen))).astype(np.float64)
        targets = targets[finite & np.isfinite(targets).all(axis=1)]
        stats["target_mean_square"] = float(np.mean(np.sum(targets**2, axis=1)) / scale**2)
    return stats
