"""JumpReLU transcoders (SPEC.md 5) take the SAE's fused and sparse steps.

The reference is autodiff of `arch.transcoder_loss` with the `arch.JumpReLU` rule: the
straight-through primitives composed plainly, a second code path. Target and input widths
differ (d_out != d_in), so a wiring mix-up cannot pass; every case runs with and without
the skip map W_skip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.config import TrainConfig
from gemmascope.train import arch, sparse
from gemmascope.train.group import Group, init_state
from gemmascope.train.jumprelu import fused_loss_fn
from tests.train_helpers import assert_same_grads, assert_same_trained_params, train_both_ways

D_IN, D_OUT, WIDTH, BATCH, BANDWIDTH = 24, 20, 384, 128, 0.05


def _low_activity_transcoder(fraction: float, skip: bool, seed: int = 0):
    """(params, x, y): thresholds at each latent's (1 - fraction) quantile on x, so a
    fraction of the rows fire and some sit inside the straight-through band; non-zero
    biases and skip map; y a noisy linear map of x."""
    keys = jax.random.split(jax.random.key(seed), 6)
    params = arch.init_transcoder(keys[0], D_IN, D_OUT, WIDTH, threshold=0.001, skip=skip)
    params = params._replace(b_enc=jax.random.normal(keys[1], (WIDTH,)) * 0.05,
                             b_dec=jax.random.normal(keys[2], (D_OUT,)) * 0.1,
                             W_skip=jax.random.normal(keys[3], (D_IN, D_OUT)) * 0.1 if skip else None)
    x = jax.random.normal(keys[4], (BATCH, D_IN))
    y = x @ (jax.random.normal(keys[5], (D_IN, D_OUT)) / D_IN**0.5) + 0.3 * jax.random.normal(keys[5], (BATCH, D_OUT))
    pre = np.asarray(x @ params.W_enc + params.b_enc)
    theta = np.maximum(np.quantile(pre, 1.0 - fraction, axis=0), 1e-3)
    return params._replace(log_threshold=jnp.log(jnp.asarray(theta, jnp.float32))), x, y


def _pre(params, x) -> np.ndarray:
    """x @ W_enc + b_enc in float64: a transcoder has no pre-encoder bias."""
    return np.asarray(x, np.float64) @ np.asarray(params.W_enc, np.float64) + np.asarray(params.b_enc)


def _reference(params, x, y, sparsity):
    rule = arch.JumpReLU(sparsity=sparsity, bandwidth=BANDWIDTH)
    return jax.value_and_grad(lambda p: arch.transcoder_loss(rule, p, x, y), has_aux=True)(params)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("sparsity", [0.0, 3e-3])
def test_fused_step_equals_autodiff_of_the_rule(skip, sparsity):
    params, x, y = _low_activity_transcoder(0.05, skip)
    band = np.abs(_pre(params, x) - np.exp(np.asarray(params.log_threshold))) < BANDWIDTH / 2
    assert band.sum() > 20  # the threshold gradients have band terms to get right

    (ref_loss, ref_out), ref_grads = _reference(params, x, y, sparsity)
    (loss, out), grads = jax.value_and_grad(
        lambda p: fused_loss_fn(p, x, sparsity, BANDWIDTH, "float32", y), has_aux=True)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for field in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(out, field), getattr(ref_out, field), rtol=1e-5, err_msg=field)
    assert np.array_equal(out.fired, ref_out.fired)
    assert_same_grads(grads, ref_grads)

    # Input and target gradients too (for users who differentiate through a transcoder).
    rule = arch.JumpReLU(sparsity=sparsity, bandwidth=BANDWIDTH)
    ref_dx, ref_dy = jax.grad(lambda a, b: arch.transcoder_loss(rule, params, a, b)[0], argnums=(0, 1))(x, y)
    dx, dy = jax.grad(lambda a, b: fused_loss_fn(params, a, sparsity, BANDWIDTH, "float32", b)[0],
                      argnums=(0, 1))(x, y)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dy, ref_dy, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
@pytest.mark.parametrize("slots, branch", [(64, "sparse"), (4, "dense")])
def test_sparse_step_equals_autodiff_of_the_rule(skip, slots, branch):
    params, x, y = _low_activity_transcoder(0.04, skip)
    floor = np.exp(np.asarray(params.log_threshold, np.float64)) - BANDWIDTH
    needed = int((_pre(params, x) > floor).sum(axis=1).max())
    assert (needed <= slots) == (branch == "sparse"), needed

    loss, out, grads, took = jax.jit(
        lambda p: sparse.value_and_grad(p, x, 3e-3, BANDWIDTH, "float32", slots, y))(params)
    assert bool(took) == (branch == "sparse")
    (ref_loss, ref_out), ref_grads = _reference(params, x, y, 3e-3)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for field in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(out, field), getattr(ref_out, field), rtol=1e-5, err_msg=field)
    assert np.array_equal(out.fired, ref_out.fired)
    assert_same_grads(grads, ref_grads)


def test_transcoder_training_steps_equal_with_and_without_the_sparse_path():
    """Five steps of a plain and a skip transcoder in one group: the sparse path runs and
    leaves the same parameters as the dense step."""
    plain, x, y = _low_activity_transcoder(0.03, skip=False)
    skipping, _, _ = _low_activity_transcoder(0.03, skip=True)
    config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, lr=1e-3, lr_warmup_steps=0,
                         sparsity_warmup_steps=0, bandwidth=BANDWIDTH, sparse_max_density=0.25)
    group = Group.of(D_IN, [(WIDTH, 1e-3), (WIDTH, 3e-3)], d_out=D_OUT, skips=[False, True])
    state = init_state(group, config, jax.random.key(0))
    state = state._replace(params=(plain, skipping._replace(W_enc=plain.W_enc, b_enc=plain.b_enc,
                                                            log_threshold=plain.log_threshold)))
    floor = np.exp(np.asarray(plain.log_threshold, np.float64)) - BANDWIDTH
    assert (_pre(plain, x) > floor).sum(axis=1).max() <= sparse.capacity(WIDTH, config)
    rows = jnp.concatenate([x, y], axis=1)
    dense_state, dense_metrics, sparse_state, sparse_metrics = train_both_ways(group, config, state, rows)
    assert sparse_metrics["sparse_step"].all() and not dense_metrics["sparse_step"].any()
    np.testing.assert_allclose(sparse_metrics["l0"], dense_metrics["l0"])
    np.testing.assert_allclose(sparse_metrics["fvu"], dense_metrics["fvu"], rtol=1e-5)
    assert_same_trained_params(dense_state.params, sparse_state.params, state.params)
