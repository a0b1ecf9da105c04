"""Where a rule sits: an SAE reconstructs its input, a transcoder predicts a target.

    SAE (SPEC.md 2):        pre = (x - b_dec) @ W_enc + b_enc     y_hat = f @ W_dec + b_dec        target x
    transcoder (SPEC.md 5): pre = x @ W_enc + b_enc               y_hat = f @ W_dec + b_dec        target y
    skip transcoder:        pre = x @ W_enc + b_enc               y_hat = f @ W_dec + b_dec + x @ W_skip

A transcoder has no pre-encoder bias: b_dec lives in the output space, which is not the
input's. Any rule plugs into either wiring; Gemma Scope transcoders use `JumpReLU`
(Gemma Scope 1) or `TargetL0JumpReLU` (Gemma Scope 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemmascope.train.arch.base import Outputs, Params, Rule
from gemmascope.train.jumprelu import add_bias, encode_pre, init_params, input_matmul, output_offset


def init_sae(key: jax.Array, d_in: int, d_sae: int, threshold: float | None = None) -> Params:
    """`jumprelu.init_params` (unit-norm He-uniform decoder, encoder = its transpose, zero
    biases), with log_threshold only for JumpReLU rules (`threshold` given)."""
    params = init_params(key, d_in, d_sae, 0.001 if threshold is None else threshold)
    return Params(params.W_enc, params.b_enc, params.W_dec, params.b_dec,
                  None if threshold is None else params.log_threshold)


def init_transcoder(key: jax.Array, d_in: int, d_out: int, d_sae: int, threshold: float | None = None,
                    skip: bool = False) -> Params:
    """Decoder as for an SAE, in the output space; encoder drawn independently.

    SPEC.md 5 leaves the encoder's init open but rules out the decoder's transpose (the
    two sides live in different spaces). The encoder is the SAE encoder's distribution
    without the tie: the transpose of an independent unit-row decoder over d_in, so
    pre-activations start at the same scale as an SAE's on unit-norm inputs. W_skip
    starts at zero, so a fresh skip transcoder computes exactly what a plain one does
    and the skip map is learnt from nothing.
    """
    dec_key, enc_key = jax.random.split(key)
    decoder = init_sae(dec_key, d_out, d_sae, threshold)
    return decoder._replace(W_enc=init_params(enc_key, d_in, d_sae).W_enc,
                            W_skip=jnp.zeros((d_in, d_out), jnp.float32) if skip else None)


def sae_loss(rule: Rule, params: Params, x: jax.Array, dead: jax.Array | None = None
             ) -> tuple[jax.Array, Outputs]:
    """(loss, outputs) of an SAE on normalised inputs x [B, d_in]; `dead` [d_sae] feeds AuxK."""
    return rule.loss(params, encode_pre(params, x), params.b_dec, x, dead)


def transcoder_pre(params: Params, x: jax.Array) -> jax.Array:
    """Pre-activations without a pre-encoder bias: x @ W_enc + b_enc."""
    return add_bias(input_matmul(x, params.W_enc), params.b_enc)


def transcoder_offset(params: Params, x: jax.Array) -> jax.Array:
    """The output not explained by latents: b_dec, plus x @ W_skip for a skip transcoder
    (`jumprelu.output_offset`, which the fused JumpReLU transcoder step shares)."""
    return output_offset(params, x)


def transcoder_loss(rule: Rule, params: Params, x: jax.Array, y: jax.Array, dead: jax.Array | None = None
                    ) -> tuple[jax.Array, Outputs]:
    """(loss, outputs) of a (skip) transcoder from inputs x [B, d_in] to targets y [B, d_out]."""
    return rule.loss(params, transcoder_pre(params, x), transcoder_offset(params, x), y, dead)
