"""SAE architectures beyond the Gemma Scope 1 recipe, as pure, differentiable JAX losses.

A *rule* (frozen dataclass of knobs) turns pre-activations into latents and a loss:
`JumpReLU`, `TargetL0JumpReLU`, `ReLUL1`, `TopK`, `BatchTopK`, `MatryoshkaBatchTopK`.
A *wiring* applies it as an SAE (`sae_loss`) or a (skip) transcoder (`transcoder_loss`).
Every loss returns (loss, `Outputs`); differentiate with `jax.grad(..., has_aux=True)`.
"""

from gemmascope.train.arch.auxk import auxk_loss
from gemmascope.train.arch.base import Outputs, Params, Rule
from gemmascope.train.arch.batchtopk import BatchTopK, ThresholdEstimate, batchtopk_to_jumprelu
from gemmascope.train.arch.jumprelu_rules import JumpReLU, TargetL0JumpReLU
from gemmascope.train.arch.matryoshka import MatryoshkaBatchTopK, nested_prefixes
from gemmascope.train.arch.relu_l1 import ReLUL1
from gemmascope.train.arch.topk import TopK
from gemmascope.train.arch.wiring import (
    init_sae,
    init_transcoder,
    sae_loss,
    transcoder_loss,
    transcoder_offset,
    transcoder_pre,
)

__all__ = [
    "BatchTopK", "JumpReLU", "MatryoshkaBatchTopK", "Outputs", "Params", "ReLUL1", "Rule", "TargetL0JumpReLU",
    "ThresholdEstimate", "TopK", "auxk_loss", "batchtopk_to_jumprelu", "init_sae", "init_transcoder",
    "nested_prefixes", "sae_loss", "transcoder_loss", "transcoder_offset", "transcoder_pre",
]
