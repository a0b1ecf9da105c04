"""How the training step is laid out for XLA: the same values, fewer passes.

`input_matmul` must give autodiff's gradients (checked against numpy in float64), and
`after_every_read` must change no value while letting XLA update the encoder in place
(checked on the compiled step: no copy of a [d_in, width] array).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope.config import TrainConfig
from gemmascope.train import group as group_module
from gemmascope.train.group import Group, after_every_read, init_state, make_train_step
from gemmascope.train.jumprelu import batch_major, input_matmul


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
