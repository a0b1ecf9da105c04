"""The JumpReLU SAE of SPEC.md section 2: parameters, forward pass, loss, straight-through gradients.

Both discontinuous functions get straight-through pseudo-derivatives through
`jax.custom_vjp`, with the rectangle kernel K(u) = 1[-1/2 < u < 1/2] and bandwidth eps:

    JumpReLU(pre, theta) = pre * H(pre - theta)
        d/dpre   = H(pre - theta)
        d/dtheta = -(theta / eps) * K((pre - theta) / eps)
    H(pre - theta) (the L0 term)
        d/dpre   = 0                      # sparsity reaches the encoder only through theta
        d/dtheta = -(1 / eps) * K((pre - theta) / eps)

Threshold gradients are summed over the batch (the cotangent of a [d_sae] vector).
The encoder input is written as x @ W_enc + (b_enc - b_dec @ W_enc): the same function
as (x - b_dec) @ W_enc + b_enc, but the gradient to b_dec is a matrix-vector product
instead of a [batch, d_in] matmul, so a step costs 10 * batch * d_in * d_sae FLOPs.

The fused step serves both wirings of `arch.wiring`: an SAE (target x, pre-encoder bias
b_dec) and a JumpReLU transcoder (SPEC.md 5: a target y, no pre-encoder bias, and a skip
transcoder's x @ W_skip added to the output), selected by passing the target y.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


class JumpReLUParams(NamedTuple):
    W_enc: jax.Array  # [d_in, d_sae]
    b_enc: jax.Array  # [d_sae]
    W_dec: jax.Array  # [d_sae, d_in], unit-norm rows
    b_dec: jax.Array  # [d_in]
    log_threshold: jax.Array  # [d_sae]; theta = exp(log_threshold) > 0


def rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    return pre * (pre > theta).astype(pre.dtype)


def _jumprelu_fwd(pre, theta, bandwidth):
    return jumprelu(pre, theta, bandwidth), (pre, theta)


def _jumprelu_bwd(bandwidth, residuals, g):
    pre, theta = residuals
    d_pre = (pre > theta).astype(pre.dtype) * g
    d_theta = -(theta / bandwidth) * rectangle((pre - theta) / bandwidth) * g
    return d_pre, batch_sum(d_theta)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(pre - theta), with the straight-through threshold gradient of the L0 penalty."""
    return (pre > theta).astype(pre.dtype)


def _step_fwd(pre, theta, bandwidth):
    return step(pre, theta, bandwidth), (pre, theta)


def _step_bwd(bandwidth, residuals, g):
    pre, theta = residuals
    d_theta = -(1.0 / bandwidth) * rectangle((pre - theta) / bandwidth) * g
    return jnp.zeros_like(pre), batch_sum(d_theta)


step.defvjp(_step_fwd, _step_bwd)


def init_params(key: jax.Array, d_in: int, d_sae: int, threshold: float = 0.001) -> JumpReLUParams:
    """He-uniform decoder with unit-norm rows, encoder = decoder transpose, zero biases."""
    bound = (6.0 / d_sae) ** 0.5  # He-uniform on the decoder's fan-in (d_sae)
    W_dec = jax.random.uniform(key, (d_sae, d_in), jnp.float32, -bound, bound)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    return JumpReLUParams(
        W_enc=W_dec.T,
        b_enc=jnp.zeros((d_sae,), jnp.float32),
        W_dec=W_dec,
        b_dec=jnp.zeros((d_in,), jnp.float32),
        log_threshold=jnp.full((d_sae,), jnp.log(threshold), jnp.float32),
    )


def batch_major(rows: jax.Array) -> jax.Array:
    """rows.T [d_in, batch] as an array of its own, to contract over the batch.

    On the CPU, XLA folds a plain `rows.T @ d_pre` into one dot contracting the leading
    dimension of both operands, which runs at ~0.6x the rate of the same product with
    the transposed rows stored (measured at d_in 640 and 2,304, batch 1,024); the
    optimisation barrier keeps the [d_in, batch] copy, which costs a pass over the
    batch, not over the [d_in, width] gradient. Other backends transpose in the matmul.
    """
    if jax.default_backend() != "cpu":
        return rows.T
    return jax.lax.optimization_barrier(rows.T)


def batch_sum(rows: jax.Array) -> jax.Array:
    """The per-latent sums of rows [..., d_sae] over every leading dimension, in float32.

    On the CPU, XLA reduces a wide array over its leading dimension at about 1 GB/s
    (0.30 s for a [1024, 65536] float32 array; the JumpReLU step makes two such sums);
    the same sums as the matrix-vector product ones @ rows stream the array at the
    memory's rate (9 ms). Other backends reduce directly.
    """
    rows = rows.reshape(-1, rows.shape[-1])
    if jax.default_backend() != "cpu":
        return jnp.sum(rows, axis=0, dtype=jnp.float32)
    return jnp.matmul(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=jnp.float32)


@jax.custom_vjp
def input_matmul(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """rows [batch, d_in] @ weights [d_in, width], whose weight gradient contracts
    `batch_major(rows)`: what autodiff of a plain `@` would fold into the slow form."""
    return rows @ weights


def _input_matmul_fwd(rows, weights):
    return rows @ weights, (rows, weights)


def _input_matmul_bwd(residuals, g):
    rows, weights = residuals
    return g @ weights.T, batch_major(rows) @ g


input_matmul.defvjp(_input_matmul_fwd, _input_matmul_bwd)


@jax.custom_vjp
def add_bias(rows: jax.Array, bias: jax.Array) -> jax.Array:
    """rows [..., width] + bias [width], whose bias gradient is `batch_sum` of the
    upstream gradient: autodiff of a plain `+` would reduce over the batch the slow way."""
    return rows + bias


def _add_bias_fwd(rows, bias):
    return rows + bias, None


def _add_bias_bwd(_, g):
    return g, batch_sum(g)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def encode_pre(params: JumpReLUParams, x: jax.Array) -> jax.Array:
    """Pre-activations with the pre-encoder bias: (x - b_dec) @ W_enc + b_enc."""
    return add_bias(input_matmul(x, params.W_enc), params.b_enc - params.b_dec @ params.W_enc)


class Outputs(NamedTuple):
    loss: jax.Array  # mean over the batch of ||x - x_hat||^2 + lambda * L0
    mse: jax.Array  # mean over the batch of ||x - x_hat||^2 (summed over d_in)
    l0: jax.Array  # mean active latents per row
    fired: jax.Array  # [d_sae] bool: latent active on some row of the batch
    total_variance: jax.Array  # sum over the batch of ||x - mean(x)||^2 (for FVU)
    error_sum: jax.Array  # sum over the batch of ||x - x_hat||^2


def loss_fn(params: JumpReLUParams, x: jax.Array, sparsity: jax.Array, bandwidth: float) -> tuple[jax.Array, Outputs]:
    """The training loss on normalised inputs x [batch, d_in] and its diagnostics."""
    pre = encode_pre(params, x)
    theta = jnp.exp(params.log_threshold)
    f = jumprelu(pre, theta, bandwidth)
    x_hat = f @ params.W_dec + params.b_dec
    error = jnp.sum((x - x_hat) ** 2, axis=-1)
    active = step(pre, theta, bandwidth)
    l0 = jnp.mean(jnp.sum(active, axis=-1))
    mse = jnp.mean(error)
    loss = mse + sparsity * l0
    centred = x - jnp.mean(x, axis=0)
    outputs = Outputs(
        loss=loss,
        mse=mse,
        l0=l0,
        fired=jax.lax.stop_gradient(jnp.any(active > 0, axis=0)),
        total_variance=jax.lax.stop_gradient(jnp.sum(centred**2)),
        error_sum=jax.lax.stop_gradient(jnp.sum(error)),
    )
    return loss, outputs


def _matmul(a: jax.Array, b: jax.Array, dtype: str, out=jnp.float32) -> jax.Array:
    """a @ b with operands in `dtype`, accumulated in float32 and returned as `out`.

    bfloat16 operands run the matmuls on a GPU's or TPU's tensor cores at full rate; the
    parameters, their gradients and the pre-activations stay float32, so the threshold
    comparisons and the straight-through band are resolved at float32.
    """
    if dtype == "float32":
        return a @ b
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=out)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_loss_fn(params: JumpReLUParams, x: jax.Array, sparsity: jax.Array, bandwidth: float,
                  matmul_dtype: str = "float32", y: jax.Array | None = None) -> tuple[jax.Array, Outputs]:
    """`loss_fn` with one hand-written backward pass: the same values and gradients, with
    the elementwise work of both straight-through estimators done in one pass over the
    [batch, d_sae] pre-activations and exactly three backward matmuls. Training runs the
    same two passes through `dense_value_and_grad` (or the sparse path, tested against
    this); `loss_fn`, built from the two primitives above, is the readable definition
    this is tested against. `matmul_dtype` "bfloat16" rounds the five matmuls' operands.
    With a target `y` it is a JumpReLU transcoder's loss (`arch.transcoder_loss` with the
    `arch.JumpReLU` rule): params may then carry a skip transcoder's W_skip."""
    return _fused_forward(params, x, y, sparsity, matmul_dtype)[0]


def encode_pre_matmul(params: JumpReLUParams, x: jax.Array, matmul_dtype: str, transcoder: bool = False) -> jax.Array:
    """`encode_pre` with the matmul's operands in `matmul_dtype`; a transcoder's has no
    pre-encoder bias (`arch.transcoder_pre`)."""
    bias = params.b_enc if transcoder else params.b_enc - params.b_dec @ params.W_enc
    return _matmul(x, params.W_enc, matmul_dtype) + bias


def output_offset(params, x: jax.Array) -> jax.Array:
    """The part of the output the latents do not explain: b_dec, plus x @ W_skip for a skip
    transcoder (params without a W_skip field, or with None there, have none)."""
    W_skip = getattr(params, "W_skip", None)
    return params.b_dec if W_skip is None else input_matmul(x, W_skip) + params.b_dec


def decoder_bias_grad(params, g_xhat: jax.Array, d_b_enc: jax.Array, transcoder: bool = False) -> jax.Array:
    """b_dec's gradient: it is added to the output and, in an SAE, subtracted from the
    encoder's input (a transcoder's b_dec lives in the output space only)."""
    added = jnp.sum(g_xhat, axis=0)
    return added if transcoder else added - params.W_enc @ d_b_enc


def wiring_grads(params, x: jax.Array, g_xhat: jax.Array, transcoder: bool, *, W_enc: jax.Array,
                 b_enc: jax.Array, W_dec: jax.Array, log_threshold: jax.Array, matmul_dtype: str = "float32"):
    """All gradients of a JumpReLU SAE or transcoder (the type of `params`) from the
    latent side's, with the wiring's own: b_dec's, and a skip transcoder's x^T dL/dy_hat."""
    grads = params._replace(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, log_threshold=log_threshold,
                            b_dec=decoder_bias_grad(params, g_xhat, b_enc, transcoder))
    if getattr(params, "W_skip", None) is not None:
        grads = grads._replace(W_skip=_matmul(batch_major(x), g_xhat, matmul_dtype))
    return grads


def _fused_forward(params, x, y, sparsity, matmul_dtype, pre=None):
    transcoder = y is not None
    target = y if transcoder else x
    pre = encode_pre_matmul(params, x, matmul_dtype, transcoder) if pre is None else pre
    theta = jnp.exp(params.log_threshold)
    active = pre > theta
    f = jnp.where(active, pre, 0.0).astype(matmul_dtype)
    diff = _matmul(f, params.W_dec, matmul_dtype) + output_offset(params, x) - target
    error = jnp.sum(diff * diff, axis=-1)
    l0 = jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.float32))
    mse = jnp.mean(error)
    loss = mse + sparsity * l0
    centred = target - jnp.mean(target, axis=0)
    outputs = Outputs(loss, mse, l0, jnp.any(active, axis=0), jnp.sum(centred**2), jnp.sum(error))
    return (loss, outputs), (pre, f, diff)


def _forward_with_residuals(params, x, y, sparsity, matmul_dtype, pre=None):
    result, (pre, f, diff) = _fused_forward(params, x, y, sparsity, matmul_dtype, pre)
    # float32 recomputes the latents from `pre` in the backward pass (one [batch, d_sae]
    # buffer fewer, same speed); bfloat16 keeps its half-size copy (one pass fewer).
    kept = None if matmul_dtype == "float32" else f
    return result, (params, x, y, sparsity, pre, kept, diff, result[1].l0)


def _fused_fwd(params, x, sparsity, bandwidth, matmul_dtype, y):
    return _forward_with_residuals(params, x, y, sparsity, matmul_dtype)


def _fused_bwd(bandwidth, matmul_dtype, residuals, cotangents):
    params, x, y, sparsity, pre, f, diff, l0 = residuals
    transcoder = y is not None
    g = cotangents[0]  # the diagnostics carry no gradient
    batch = x.shape[0]
    theta = jnp.exp(params.log_threshold)
    active = pre > theta
    g_xhat = (2.0 * g / batch) * diff
    f = jnp.where(active, pre, 0.0) if f is None else f
    d_W_dec = _matmul(f.T, g_xhat, matmul_dtype)
    # In matmul_dtype: it only feeds the encoder-gradient matmul and sums over the batch.
    d_f = _matmul(g_xhat, params.W_dec.T, matmul_dtype, out=matmul_dtype)
    d_pre = jnp.where(active, d_f, 0.0)
    # Both threshold pseudo-derivatives at once: -(1/eps) K(u) (theta * dL/df + g * lambda / B).
    band = rectangle((pre - theta) / bandwidth)
    d_theta = -(1.0 / bandwidth) * batch_sum(band * (theta * d_f + g * sparsity / batch))
    encoder_input = x if transcoder else x - params.b_dec
    grads = wiring_grads(params, x, g_xhat, transcoder, W_enc=_matmul(batch_major(encoder_input), d_pre, matmul_dtype),
                         b_enc=batch_sum(d_pre), W_dec=d_W_dec, log_threshold=d_theta * theta,
                         matmul_dtype=matmul_dtype)
    # Dropped by XLA unless someone differentiates x (or y).
    d_x = d_pre @ params.W_enc.T
    if not transcoder:
        return grads, d_x - g_xhat, g * l0, None
    W_skip = getattr(params, "W_skip", None)
    return grads, d_x if W_skip is None else d_x + g_xhat @ W_skip.T, g * l0, -g_xhat


fused_loss_fn.defvjp(_fused_fwd, _fused_bwd)


def dense_value_and_grad(params: JumpReLUParams, x: jax.Array, sparsity: jax.Array, pre: jax.Array, *,
                         bandwidth: float, matmul_dtype: str, y: jax.Array | None = None
                         ) -> tuple[jax.Array, Outputs, JumpReLUParams]:
    """(loss, diagnostics, gradients) of `fused_loss_fn` given the pre-activations already
    computed, so a caller that measured them (to choose the sparse path) pays no second
    encoder matmul."""
    result, residuals = _forward_with_residuals(params, x, y, sparsity, matmul_dtype, pre)
    grads, *_ = _fused_bwd(bandwidth, matmul_dtype, residuals, (jnp.ones((), jnp.float32), None))
    return result[0], result[1], grads


def encode(params: JumpReLUParams, x: jax.Array) -> jax.Array:
    """Latents at training scale (no gradients needed)."""
    pre = encode_pre(params, x)
    theta = jnp.exp(params.log_threshold)
    return pre * (pre > theta)


def decode(params: JumpReLUParams, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec
