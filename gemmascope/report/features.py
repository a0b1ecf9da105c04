"""What a latent does: its top-activating held-out contexts, its activation histogram, and
the output tokens its decoder direction promotes and suppresses.

Activations come from the held-out rows of the store (never trained on); each row's token
and sequence come from the store's token table, so a context is the rows just before and
after the top row within the same sequence. The logit effect is the decoder row carried
into the residual stream (through o_proj for `att`), scaled by the final norm's weight
and read out by the unembedding, a direct-path approximation that ignores later layers.
A transcoder's latents are read from the rows of its INPUT site (mlp_in), and its decoder
rows live in its target's space (the MLP output), which the caller's
`residual_direction` carries into the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemmascope.store import ActivationStore
from gemmascope.train.release import release_encode

BLOCK_ROWS = 4096


@dataclass(frozen=True)
class Feature:
    latent: int
    density: float
    contexts: list[list[tuple[str, float]]]  # per top example: (token text, activation) in order
    top_activation: float
    histogram: tuple[list[int], list[float]]  # counts, bin edges of the nonzero activations
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


def _latents(store: ActivationStore, site: str, layer: int, start: int, stop: int,
             released: dict[str, np.ndarray], k: int | None = None) -> np.ndarray:
    """Latent activations [rows, d_sae] on the held-out rows of `site` (an SAE's or a
    transcoder's input); with `k`, of a TopK SAE."""
    blocks = [release_encode(released, np.asarray(store.read(site, layer, b, min(b + BLOCK_ROWS, stop)), np.float32),
                             k)
              for b in range(start, stop, BLOCK_ROWS)]
    return np.concatenate(blocks)


def sample_features(store: ActivationStore, site: str, layer: int, start: int, stop: int,
                    released: dict[str, np.ndarray], *, tokens: np.ndarray, sequences: np.ndarray,
                    decode, residual_direction, unembed: np.ndarray, count: int, examples: int,
                    seed: int = 0, k: int | None = None) -> list[Feature]:
    """`count` live latents (seeded sample) with `examples` top contexts each.

    `tokens` and `sequences` give each held-out row's token id and sequence id; `decode`
    turns a token id into text; `residual_direction` maps a decoder row into the residual
    stream, ready for the unembedding [vocab, d_model]; `k`: a TopK SAE's.
    """
    latents = _latents(store, site, layer, start, stop, released, k)
    density = (latents != 0).mean(axis=0)
    alive = np.flatnonzero(density > 0)
    chosen = np.sort(np.random.default_rng(seed).choice(alive, size=min(count, len(alive)), replace=False))
    acts = latents[:, chosen]
    features = []
    for column, latent in enumerate(chosen):
        values = acts[:, column]
        top = np.argsort(-values, kind="stable")[:examples]
        contexts = []
        for row in top[values[top] > 0]:
            window = [r for r in range(max(row - 12, 0), min(row + 4, len(values)))
                      if sequences[r] == sequences[row]]
            contexts.append([(decode(int(tokens[r])), float(values[r])) for r in window])
        nonzero = values[values > 0]
        counts, edges = np.histogram(nonzero, bins=20) if len(nonzero) else (np.zeros(0, int), np.zeros(1))
        logits = unembed @ residual_direction(released["W_dec"][latent])
        order = np.argsort(logits)
        features.append(Feature(
            int(latent), float(density[latent]), contexts, float(values.max()), (counts.tolist(), edges.tolist()),
            [(decode(int(t)), float(logits[t])) for t in order[::-1][:10]],
            [(decode(int(t)), float(logits[t])) for t in order[:10]]))
    return features
