"""Metrics of a released SAE on held-out stored activations: L0, FVU, MSE, latent densities.

Computed at the released (raw) scale, in float64 accumulators over blocks of rows, so
the figures do not depend on the training-time normalisation.
"""

from __future__ import annotations

import numpy as np

from gemmascope.store import ActivationStore
from gemmascope.train.release import release_decode, release_encode

BLOCK_ROWS = 4096
# log10 of firing density: bins from 1e-8 to 1 (a latent never firing is counted as dead).
DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)


def activation_metrics(store: ActivationStore, site: str, layer: int, start: int, stop: int,
                       released: dict[str, np.ndarray], dense_threshold: float) -> dict:
    n = 0
    l0_sum = error_sum = square_sum = 0.0
    column_sum = np.zeros(released["b_dec"].shape, np.float64)
    fired = np.zeros(released["b_enc"].shape, np.int64)
    for begin in range(start, stop, BLOCK_ROWS):
        x = np.asarray(store.read(site, layer, begin, min(begin + BLOCK_ROWS, stop)), np.float32)
        f = release_encode(released, x)
        x_hat = release_decode(released, f)
        active = f != 0
        n += len(x)
        l0_sum += float(active.sum())
        fired += active.sum(axis=0)
        error_sum += float(np.sum((x.astype(np.float64) - x_hat) ** 2))
        square_sum += float(np.sum(x.astype(np.float64) ** 2))
        column_sum += x.sum(axis=0, dtype=np.float64)
    total_variance = square_sum - float(column_sum @ column_sum) / n
    density = fired / n
    alive = density[density > 0]
    counts, _ = np.histogram(np.log10(alive), bins=DENSITY_EDGES)
    return {
        "eval_rows": n,
        "l0": l0_sum / n,
        "mse": error_sum / n,
        "fvu": error_sum / total_variance,
        "dead_fraction": float(np.mean(density == 0)),
        "dense_fraction": float(np.mean(density > dense_threshold)),
        "density_histogram": {"log10_edges": DENSITY_EDGES.tolist(), "counts": counts.tolist(),
                              "dead": int(np.sum(density == 0))},
    }
