"""The Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

The dictionary is read as nested prefixes of sizes m_1 < m_2 < ... < m_n = d_sae. Each
prefix must reconstruct the target alone from its own latents, with the BatchTopK
selection made once over the whole dictionary:

    y_hat_j = f[:, :m_j] @ W_dec[:m_j] + offset
    loss    = mean_j mean_rows ||y - y_hat_j||^2 + aux_coefficient * auxk(y - y_hat_n)

so the first latents must carry the most general features and later ones refine them
instead of absorbing them (feature absorption/splitting). The loss is the mean over
prefixes, not the sum: with one prefix it is exactly the BatchTopK loss, and the
scale (hence the AuxK coefficient and learning rate) does not grow with the number of
prefixes. The prefix reconstructions are cumulative sums of per-block matmuls, so all
n cost one full decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gemmascope.train.arch.auxk import auxk_terms
from gemmascope.train.arch.base import Outputs, Params, squared_error, summarise
from gemmascope.train.arch.batchtopk import batch_topk_latents


def nested_prefixes(width: int, levels: int) -> tuple[int, ...]:
    """Halving prefix sizes ending at the width: (w/8, w/4, w/2, w) for 4 levels."""
    if width % 2 ** (levels - 1):
        raise ValueError(f"width {width} is not divisible by 2^{levels - 1}")
    return tuple(width // 2**level for level in reversed(range(levels)))


@dataclass(frozen=True)
class MatryoshkaBatchTopK:
    k: int
    prefixes: tuple[int, ...]  # nested dictionary sizes, increasing; the last is d_sae
    aux_k: int = 512
    aux_coefficient: float = 1.0 / 32.0

    def __post_init__(self):
        sizes = tuple(int(size) for size in self.prefixes)
        object.__setattr__(self, "prefixes", sizes)  # hashable and immutable, whatever was passed
        if not sizes or sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(f"prefixes must be positive and strictly increasing, got {sizes}")

    def loss(self, params: Params, pre: jax.Array, offset: jax.Array, y: jax.Array,
             dead: jax.Array | None) -> tuple[jax.Array, Outputs]:
        if self.prefixes[-1] != pre.shape[-1]:
            raise ValueError(f"the last prefix {self.prefixes[-1]} must be the width {pre.shape[-1]}")
        f, kept_minimum = batch_topk_latents(pre, self.k)
        y_hat, prefix_mse, start = offset, [], 0
        for end in self.prefixes:
            y_hat = y_hat + f[:, start:end] @ params.W_dec[start:end]
            prefix_mse.append(jnp.mean(squared_error(y, y_hat)))
            start = end
        aux, terms = auxk_terms(params, pre, y, y_hat, dead, self.aux_k, self.aux_coefficient)
        loss = jnp.mean(jnp.stack(prefix_mse)) + aux
        terms = {**terms, "kept_minimum": kept_minimum, "prefix_mse": jnp.stack(prefix_mse)}
        return loss, summarise(loss, y, y_hat, f, f > 0, terms)
