"""How the training step is laid out for XLA: the same values, fewer passes.

`input_matmul`, `add_bias` and `batch_sum` must give autodiff's values and gradients
(checked against numpy in float64), the compiled step must sum nothing over the batch
with XLA's slow reduction, and `after_every_read` must change no value while letting
XLA update the encoder in place (checked on the compiled step: no copy of a
[d_in, width] array).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope.config import TrainConfig
from gemmascope.train import group as group_module
from gemmascope.train.group import Group, after_every_read, init_state, make_train_step
from gemmascope.train.jumprelu import add_bias, batch_major, batch_sum, input_matmul


def test_batch_major_is_the_transpose():
    rows = np.random.default_rng(0).normal(size=(48, 12)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(batch_major)(jnp.asarray(rows)), rows.T)


def test_input_matmul_gradients_are_the_matmul_gradients():
    rng = np.random.default_rng(1)
    rows, weights = rng.normal(size=(64, 10)), rng.normal(size=(10, 40))
    upstream = rng.normal(size=(64, 40))

    def loss(r, w):
        return jnp.sum(input_matmul(r, w) * upstream.astype(np.float32))

    value = input_matmul(jnp.asarray(rows, jnp.float32), jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(value, rows @ weights, rtol=1e-5, atol=1e-5)
    d_rows, d_weights = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(rows, jnp.float32),
                                                                   jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(d_weights, rows.T @ upstream, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d_rows, upstream @ weights.T, rtol=1e-5, atol=1e-4)


def test_batch_sum_sums_over_the_batch_in_float32():
    rows = np.random.default_rng(3).normal(size=(96, 40))
    np.testing.assert_allclose(jax.jit(batch_sum)(jnp.asarray(rows, jnp.float32)), rows.sum(axis=0),
                               rtol=1e-5, atol=1e-5)
    halves = jnp.asarray(rows, jnp.bfloat16)
    summed = jax.jit(batch_sum)(halves)
    assert summed.dtype == jnp.float32
    np.testing.assert_allclose(summed, np.asarray(halves, np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)


def test_add_bias_gradients_are_the_sums_gradients():
    rng = np.random.default_rng(4)
    rows, bias, upstream = rng.normal(size=(64, 30)), rng.normal(size=30), rng.normal(size=(64, 30))

    def loss(r, b):
        return jnp.sum(add_bias(r, b) ** 2 * upstream.astype(np.float32))

    r, b = jnp.asarray(rows, jnp.float32), jnp.asarray(bias, jnp.float32)
    np.testing.assert_allclose(add_bias(r, b), rows + bias, rtol=1e-6, atol=1e-6)
    d_rows, d_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(r, b)
    expected = 2 * (rows + bias) * upstream
    np.testing.assert_allclose(d_rows, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_bias, expected.sum(axis=0), rtol=1e-5, atol=1e-4)
    # Rows of sequences ([batch, seq, width]) sum over every leading dimension.
    d_bias_3d = jax.grad(lambda r3, b: jnp.sum(add_bias(r3, b) ** 2 * upstream.reshape(4, 16, 30).astype(np.float32)),
                         argnums=1)(r.reshape(4, 16, 30), b)
    np.testing.assert_allclose(d_bias_3d, expected.sum(axis=0), rtol=1e-5, atol=1e-4)


def _batch_reductions(step, state, x, width: int) -> list[str]:
    """The compiled step's reduce instructions over dimension 0 of a [batch, width] array."""
    text = step.lower(state, x).compile().as_text()
    shapes = dict(re.findall(r"(%[\w.-]+) = \w+(\[[0-9,]*\])", text))
    reductions = re.findall(r"= \w+\[[0-9,]*\]\S* reduce\((%[\w.-]+),[^)]*\), dimensions=\{0\}", text)
    return [operand for operand in reductions if shapes[operand] == f"[{x.shape[0]},{width}]"]


def test_no_step_reduces_a_batch_of_latents_the_slow_way():
    """XLA's CPU reduction over the batch of a [batch, width] array runs at ~1 GB/s; every
    per-latent sum of the JumpReLU, ReLU + L1 and TopK steps and of the JumpReLU (fused)
    and target-L0 (autodiff) transcoders goes through `batch_sum` instead."""
    d_in, width, batch = 32, 256, 64
    config = TrainConfig(tokens=batch * 100, batch_size=batch, shuffle_rows=batch, sparsity_warmup_steps=1)
    x = jnp.ones((batch, d_in), jnp.float32)
    groups = {"jumprelu": (Group.of(d_in, [(width, 1e-3)]), x),
              "relu_l1": (Group.of(d_in, [(width, 1e-3)], ["relu_l1"]), x),
              "topk": (Group.of(d_in, [(width, 8.0)], ["topk"]), x),
              "transcoder": (Group.of(d_in, [(width, 1e-3)], d_out=d_in), jnp.concatenate([x, x], axis=1)),
              "target_l0_transcoder": (Group.of(d_in, [(width, 45.0)], ["jumprelu_target_l0"], d_out=d_in),
                                       jnp.concatenate([x, x], axis=1))}
    for name, (group, rows) in groups.items():
        step = jax.jit(make_train_step(group, config, 1.0), donate_argnums=0)
        state = init_state(group, config, jax.random.key(0))
        assert _batch_reductions(step, state, rows, width) == [], name


def test_after_every_read_changes_no_value():
    rng = np.random.default_rng(2)
    grads = (jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), None, jnp.asarray(rng.normal(size=7), jnp.float32))
    ordered = jax.jit(after_every_read)(grads)
    assert ordered[1] is None
    for before, after in zip((grads[0], grads[2]), (ordered[0], ordered[2]), strict=True):
        np.testing.assert_array_equal(after, before)


def _copied_shapes(step, state, x) -> list[str]:
    text = step.lower(state, x).compile().as_text()
    return re.findall(r"= (f32\[[0-9,]+\])\{[0-9,]*\} copy\(", text)


def test_the_compiled_step_updates_the_encoder_in_place(monkeypatch):
    """Without the ordering, XLA copies W_enc every step (the read for b_dec's gradient may
    come after the in-place update); with it, no [d_in, width] array is copied."""
    d_in, width, batch = 32, 256, 64
    config = TrainConfig(tokens=batch * 100, batch_size=batch, shuffle_rows=batch, sparsity_warmup_steps=1)
    group = Group.of(d_in, [(width, 1e-3)])
    state = init_state(group, config, jax.random.key(0))
    x = jnp.zeros((batch, d_in), jnp.float32)
    encoder = f"f32[{d_in},{width}]"

    ordered = jax.jit(make_train_step(group, config, 1.0), donate_argnums=0)
    assert encoder not in _copied_shapes(ordered, state, x)

    monkeypatch.setattr(group_module, "after_every_read", lambda grads: grads)
    unordered = jax.jit(make_train_step(group, config, 1.0), donate_argnums=0)
    assert encoder in _copied_shapes(unordered, state, x)
