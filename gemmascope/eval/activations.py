"""Metrics of a released SAE on held-out stored activations: L0, FVU, MSE, latent densities.

Computed at the released (raw) scale, in float64 accumulators over blocks of rows, so
the figures do not depend on the training-time normalisation. A transcoder encodes the
rows of its input site and is scored against the SAME rows of its target site (MSE and
FVU of the target: mlp_in -> mlp predicts the MLP output of the token it reads).
"""

from __future__ import annotations

import numpy as np

from gemmascope.store import ActivationStore
from gemmascope.train.release import release_decode, release_encode

BLOCK_ROWS = 4096
# log10 of firing density: bins from 1e-8 to 1 (a latent never firing is counted as dead).
DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)


class _Sums:
    """Running sums for one SAE over the blocks of held-out rows."""

    def __init__(self, released: dict[str, np.ndarray], k: int | None):
        self.released, self.k = released, k
        self.n = 0
        self.l0 = self.error = self.square = 0.0
        self.column = np.zeros(released["b_dec"].shape, np.float64)
        self.fired = np.zeros(released["b_enc"].shape, np.int64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Rows x of the input site and y of the target (y is x for an SAE)."""
        f = release_encode(self.released, x, self.k)
        y_hat = release_decode(self.released, f, x)
        active = f != 0
        self.n += len(x)
        self.l0 += float(active.sum())
        self.fired += active.sum(axis=0)
        self.error += float(np.sum((y.astype(np.float64) - y_hat) ** 2))
        self.square += float(np.sum(y.astype(np.float64) ** 2))
        self.column += y.sum(axis=0, dtype=np.float64)

    def metrics(self, dense_threshold: float) -> dict:
        n = self.n
        total_variance = self.square - float(self.column @ self.column) / n
        density = self.fired / n
        counts, _ = np.histogram(np.log10(density[density > 0]), bins=DENSITY_EDGES)
        return {
            "eval_rows": n,
            "l0": self.l0 / n,
            "mse": self.error / n,
            "fvu": self.error / total_variance,
            "dead_fraction": float(np.mean(density == 0)),
            "dense_fraction": float(np.mean(density > dense_threshold)),
            "density_histogram": {"log10_edges": DENSITY_EDGES.tolist(), "counts": counts.tolist(),
                                  "dead": int(np.sum(density == 0))},
        }


def activation_metrics(store: ActivationStore, site: str, layer: int, start: int, stop: int,
                       released: dict[str, dict[str, np.ndarray]], dense_threshold: float,
                       topk: dict[str, int] | None = None, target: str | None = None) -> dict[str, dict]:
    """Metrics of every SAE in `released` (name -> arrays) on one stream, reading each block
    once; `topk` gives the k of the TopK SAEs among them (the others are JumpReLU). With a
    `target` other than `site` they are transcoders: each block of `site` rows is encoded and
    the prediction compared with the same rows of `target`."""
    sums = {name: _Sums(arrays, (topk or {}).get(name)) for name, arrays in released.items()}
    for begin in range(start, stop, BLOCK_ROWS):
        end = min(begin + BLOCK_ROWS, stop)
        x = np.asarray(store.read(site, layer, begin, end), np.float32)
        y = x if target in (None, site) else np.asarray(store.read(target, layer, begin, end), np.float32)
        for total in sums.values():
            total.add(x, y)
    return {name: total.metrics(dense_threshold) for name, total in sums.items()}
