"""How each architecture of the config trains in the grouped step and leaves it.

`gemmascope.train.arch` holds the math (rules and wirings); this module binds it to the
trainer: which parameters an SAE has, which rule its step differentiates (built from
the SAE's knob and the train section), whether it keeps a `ThresholdEstimate`, and what
it exports as. Plain JumpReLU is not a rule here: the group step keeps its fused and
sparse hand-written backward passes for SAEs and transcoders, which `arch.JumpReLU`
equals (tested).
"""

from __future__ import annotations

import jax

from gemmascope.config import TrainConfig
from gemmascope.train import arch
from gemmascope.train.jumprelu import init_params

JUMPRELU = "jumprelu"
# Trained per-latent log-thresholds (JumpReLUParams, a released SAE can start them).
THRESHOLDED = frozenset({"jumprelu", "jumprelu_target_l0"})
# Batch rules: inference needs the running estimate of the smallest kept activation.
ESTIMATED = frozenset({"batchtopk", "matryoshka_batchtopk"})


def init_member(key: jax.Array, d_in: int, width: int, architecture: str, config: TrainConfig,
                d_out: int | None = None, skip: bool = False):
    """The recipe's initialisation (SPEC.md 2) for every architecture; log-thresholds only
    where the architecture trains them (an optimiser never sees a parameter it cannot use).
    With `d_out` a transcoder's (`arch.init_transcoder`, W_skip with `skip`)."""
    threshold = config.threshold_init if architecture in THRESHOLDED else None
    if d_out is not None:
        return arch.init_transcoder(key, d_in, d_out, width, threshold, skip)
    if threshold is not None:
        return init_params(key, d_in, width, threshold)
    return arch.init_sae(key, d_in, width)


def rule(architecture: str, knob: float, width: int, config: TrainConfig, penalty: jax.Array) -> arch.Rule:
    """The `arch` rule of a non-JumpReLU SAE at this step. `penalty` (the warm-up factor of
    train.sparsity_warmup_steps, times a transcoder's target_mean_square, `group.make_train_step`)
    scales every sparsity penalty as it scales JumpReLU's lambda; TopK-style rules have no
    penalty. JumpReLU SAEs and transcoders have no rule here: they take the hand-written
    fused step, which `arch.JumpReLU` defines (tested)."""
    if architecture == "jumprelu_target_l0":
        # The frequency penalty is priced in units of the L0 term, so it scales with it.
        return arch.TargetL0JumpReLU(target_l0=knob, l0_coefficient=config.target_l0_coefficient * penalty,
                                     frequency_threshold=config.frequency_threshold,
                                     frequency_coefficient=config.frequency_coefficient,
                                     bandwidth=config.bandwidth)
    if architecture == "relu_l1":
        return arch.ReLUL1(l1_coefficient=knob * penalty)
    aux = {"aux_k": config.aux_k, "aux_coefficient": config.aux_coefficient}
    if architecture == "topk":
        return arch.TopK(k=int(knob), **aux)
    if architecture == "batchtopk":
        return arch.BatchTopK(k=int(knob), **aux)
    if architecture == "matryoshka_batchtopk":
        return arch.MatryoshkaBatchTopK(k=int(knob), prefixes=arch.nested_prefixes(width, config.matryoshka_levels),
                                        **aux)
    raise ValueError(f"no arch rule for architecture {architecture!r}")


def as_jumprelu(architecture: str, params, estimate: arch.ThresholdEstimate | None):
    """The JumpReLU SAE an architecture is at inference (what the Gemma Scope format holds:
    the five `JumpReLUParams` fields, and a skip transcoder's W_skip), or None for TopK,
    whose per-row selection no threshold reproduces.

    BatchTopK rules: every latent gets the learned global threshold. ReLU + L1: threshold
    0, where JumpReLU is ReLU (log 0 = -inf, and the release writes exp(-inf) * C = 0).
    """
    if architecture in THRESHOLDED:
        return params
    if architecture in ESTIMATED:
        return arch.batchtopk_to_jumprelu(params, estimate.value)
    if architecture == "relu_l1":
        return arch.batchtopk_to_jumprelu(params, 0.0)
    return None
