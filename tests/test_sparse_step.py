"""The sparse training step equals the dense one: kernels against numpy, values and
gradients against the differentiable `fused_loss_fn`, whole training steps against the
dense step, and the automatic fall-back when a batch is too active."""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.config import TrainConfig
from gemmascope.train import sparse, sparse_kernels
from gemmascope.train.group import Group, init_state, make_train_step
from gemmascope.train.jumprelu import encode_pre, fused_loss_fn, init_params
from gemmascope.train.mesh import make_mesh

D_IN, WIDTH, BATCH, BANDWIDTH = 24, 384, 128, 0.05


def _padded_slots(rng, batch, width, capacity, counts):
    slots = np.full((batch, capacity), -1, np.int32)
    for b, count in enumerate(counts):
        slots[b, :count] = np.sort(rng.choice(width, count, replace=False))
    return slots


def _dense_from_slots(slots, values, width):
    dense = np.zeros((slots.shape[0], width), np.float64)
    for b, k in zip(*np.nonzero(slots >= 0), strict=True):
        dense[b, slots[b, k]] += values[b, k]
    return dense


def _unwritten(shape, dtype) -> np.ndarray:
    """A result buffer as XLA hands it over: whatever was there before (here: junk)."""
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 12345, dtype)


# One chunk and several; inputs as wide as the errors (an SAE) and narrower (a transcoder).
@pytest.mark.parametrize("batch, d_in", [(40, 12), (2 * sparse_kernels.CHUNK + 37, 12), (40, 7)])
def test_kernels_against_numpy(batch, d_in):
    rng = np.random.default_rng(0)
    width, d, capacity = 200, 12, 16
    slots = _padded_slots(rng, batch, width, capacity, rng.integers(0, capacity + 1, batch))
    values = rng.standard_normal((batch, capacity)).astype(np.float32) * (slots >= 0)
    table = rng.standard_normal((width, d)).astype(np.float32)
    vectors = rng.standard_normal((batch, d)).astype(np.float32)
    inputs = rng.standard_normal((batch, d_in)).astype(np.float32)
    f = _dense_from_slots(slots, values, width)

    decoded = _unwritten((batch, d), np.float32)  # the kernels write every element of their results
    sparse_kernels.decode(slots, values, table, decoded)
    np.testing.assert_allclose(decoded, f @ table, rtol=1e-5, atol=1e-5)
    values[rng.random(values.shape) < 0.3] = 0.0  # inactive pairs inside the band: a latent gradient, no weight terms
    f = _dense_from_slots(slots, values, width)
    dots, decoder, encoder = (_unwritten(shape, np.float32) for shape in ((batch, capacity), (width, d), (d_in, width)))
    sparse_kernels.backward(slots, values, vectors, inputs, table, dots, decoder, encoder)
    expected = np.where(slots >= 0, np.einsum("bd,bkd->bk", vectors, table[np.maximum(slots, 0)]), 0.0)
    np.testing.assert_allclose(dots, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(decoder, f.T @ vectors, rtol=1e-5, atol=1e-5)
    latent_grads = _dense_from_slots(slots, np.where(values != 0.0, expected, 0.0), width)
    np.testing.assert_allclose(encoder, inputs.T @ latent_grads, rtol=1e-5, atol=1e-5)

    pre = rng.standard_normal((batch, width)).astype(np.float32)
    floor = rng.uniform(1.0, 2.0, width).astype(np.float32)
    per_row = (pre > floor).sum(axis=1)
    for capacity in (width, int(per_row.max()) - 3):  # room for every row; the busiest rows cut short
        chosen, needed = _unwritten((batch, capacity), np.int32), np.zeros((), np.int32)
        sparse_kernels.select(pre, floor, chosen, needed)
        assert needed == per_row.max()
        for b in range(batch):
            expected = np.flatnonzero(pre[b] > floor)[:capacity]
            assert list(chosen[b, :len(expected)]) == list(expected) and (chosen[b, len(expected):] == -1).all()


def _low_activity_params(fraction: float):
    """Thresholds at each latent's (1 - fraction) quantile, some rows' pre-activations
    inside the straight-through band, non-zero biases."""
    params = init_params(jax.random.key(0), D_IN, WIDTH)
    params = params._replace(b_enc=jax.random.normal(jax.random.key(2), (WIDTH,)) * 0.05,
                             b_dec=jax.random.normal(jax.random.key(3), (D_IN,)) * 0.1)
    x = jax.random.normal(jax.random.key(1), (BATCH, D_IN))
    pre = np.asarray(encode_pre(params, x))
    theta = np.maximum(np.quantile(pre, 1.0 - fraction, axis=0), 1e-3)
    return params._replace(log_threshold=jnp.log(jnp.asarray(theta, jnp.float32))), x


def _pairs_needed(params, x) -> int:
    """The most (row, latent) pairs of any row inside or above the straight-through band."""
    centred = np.asarray(x, np.float64) - np.asarray(params.b_dec)
    pre = centred @ np.asarray(params.W_enc, np.float64) + np.asarray(params.b_enc)
    floor = np.exp(np.asarray(params.log_threshold, np.float64)) - BANDWIDTH
    return int((pre > floor).sum(axis=1).max())


@pytest.mark.parametrize("slots, branch", [(64, "sparse"), (4, "dense")])
def test_value_and_gradients_equal_the_dense_definition(slots, branch):
    params, x = _low_activity_params(0.04)
    needed = _pairs_needed(params, x)
    assert (needed <= slots) == (branch == "sparse"), needed
    theta = np.exp(np.asarray(params.log_threshold))
    band = np.abs(np.asarray(encode_pre(params, x)) - theta) < BANDWIDTH / 2
    assert band.sum() > 20  # the threshold gradients have band terms to get right

    loss, outputs, grads, took = jax.jit(
        lambda p: sparse.value_and_grad(p, x, 3e-3, BANDWIDTH, "float32", slots))(params)
    assert bool(took) == (branch == "sparse")
    (ref_loss, ref_outputs), ref_grads = jax.value_and_grad(
        lambda p: fused_loss_fn(p, x, 3e-3, BANDWIDTH), has_aux=True)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for field in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(outputs, field), getattr(ref_outputs, field), rtol=1e-5)
    assert np.array_equal(outputs.fired, ref_outputs.fired)
    for field in ref_grads._fields:
        expected, got = np.asarray(getattr(ref_grads, field)), np.asarray(getattr(grads, field))
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=field)


def test_training_steps_equal_the_dense_steps():
    """Five steps of a two-SAE group with and without the sparse path: the same parameters."""
    params, x = _low_activity_params(0.03)
    config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, lr=1e-3, lr_warmup_steps=0,
                         sparsity_warmup_steps=0, bandwidth=BANDWIDTH, sparse_max_density=0.25)
    group = Group.of(D_IN, [(WIDTH, 1e-3), (WIDTH, 3e-3)])
    state = init_state(group, config, jax.random.key(0))
    state = state._replace(params=(params, params._replace(b_enc=params.b_enc * 0.5)))
    assert all(_pairs_needed(p, x) <= sparse.capacity(WIDTH, config)
               for p in state.params)  # the sparse branch is the one taken
    dense_step = jax.jit(make_train_step(group, config, scale=1.0))
    sparse_step = jax.jit(make_train_step(group, config, scale=1.0, use_sparse=True))
    dense_state, sparse_state = state, state
    for _ in range(5):
        dense_state, dense_metrics = dense_step(dense_state, x)
        sparse_state, sparse_metrics = sparse_step(sparse_state, x)
    np.testing.assert_allclose(sparse_metrics["l0"], dense_metrics["l0"])
    assert sparse_metrics["sparse_step"].all() and not dense_metrics["sparse_step"].any()
    for dense_p, sparse_p in zip(dense_state.params, sparse_state.params, strict=True):
        for field in dense_p._fields:
            np.testing.assert_allclose(getattr(sparse_p, field), getattr(dense_p, field), rtol=1e-4, atol=1e-6,
                                       err_msg=field)


def test_sparse_path_only_where_it_can_run():
    config = TrainConfig(tokens=1024, batch_size=256, shuffle_rows=256)
    assert sparse.sparse_available(make_mesh(config), config)
    assert not sparse.sparse_available(make_mesh(config), replace(config, matmul_dtype="bfloat16"))
    assert not sparse.sparse_available(make_mesh(config), replace(config, sparse_max_density=0.0))
    if len(jax.devices()) > 1:  # the suite forces several CPU devices
        assert not sparse.sparse_available(make_mesh(replace(config, mesh_data=2)), config)
