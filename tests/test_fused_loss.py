"""The trainer's fused backward pass equals the composable definition `loss_fn`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.train.jumprelu import fused_loss_fn, init_params, loss_fn


@pytest.mark.parametrize("sparsity", [0.0, 3e-3, 10.0])
def test_fused_loss_matches_loss_fn(sparsity):
    d_in, d_sae, batch, bandwidth = 24, 96, 256, 0.05
    params = init_params(jax.random.key(0), d_in, d_sae)
    x = jax.random.normal(jax.random.key(1), (batch, d_in))
    pre = np.asarray(x @ params.W_enc)
    # Thresholds at some rows' pre-activations (+/- a fraction of the band): both
    # straight-through terms see non-zero kernel values.
    theta = np.abs(pre[3]) + bandwidth * 0.2
    params = params._replace(
        b_enc=jax.random.normal(jax.random.key(2), (d_sae,)) * 0.1,
        b_dec=jax.random.normal(jax.random.key(3), (d_in,)) * 0.1,
        log_threshold=jnp.log(jnp.asarray(theta, jnp.float32)),
    )
    in_band = np.abs(np.asarray(params.b_enc) - np.asarray(params.b_dec @ params.W_enc) + pre - theta) < bandwidth / 2
    assert in_band.sum() > 20

    reference_value, reference_out = loss_fn(params, x, sparsity, bandwidth)
    fused_value, fused_out = fused_loss_fn(params, x, sparsity, bandwidth)
    np.testing.assert_allclose(fused_value, reference_value, rtol=1e-6)
    for field in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(fused_out, field), getattr(reference_out, field), rtol=1e-6)
    assert np.array_equal(fused_out.fired, reference_out.fired)

    reference = jax.grad(lambda p: loss_fn(p, x, sparsity, bandwidth)[0])(params)
    fused = jax.grad(lambda p: fused_loss_fn(p, x, sparsity, bandwidth)[0])(params)
    for field in reference._fields:
        expected, got = np.asarray(getattr(reference, field)), np.asarray(getattr(fused, field))
        assert np.abs(expected).max() > 0 or field == "b_dec"
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=field)
    # The input gradient exists too (for users who differentiate through the SAE).
    dx_reference = jax.grad(lambda v: loss_fn(params, v, sparsity, bandwidth)[0])(x)
    dx_fused = jax.grad(lambda v: fused_loss_fn(params, v, sparsity, bandwidth)[0])(x)
    np.testing.assert_allclose(dx_fused, dx_reference, rtol=1e-5, atol=1e-6)


def test_bfloat16_matmuls_stay_close_to_float32():
    """train.matmul_dtype=bfloat16 rounds only the matmul operands: the loss and every
    gradient stay within bfloat16's relative precision (2^-8) of the float32 step."""
    d_in, d_sae, batch, bandwidth = 64, 256, 512, 0.05
    params = init_params(jax.random.key(0), d_in, d_sae, threshold=0.3)
    x = jax.random.normal(jax.random.key(1), (batch, d_in))
    full = jax.value_and_grad(lambda p: fused_loss_fn(p, x, 1e-3, bandwidth)[0])(params)
    half = jax.value_and_grad(lambda p: fused_loss_fn(p, x, 1e-3, bandwidth, "bfloat16")[0])(params)
    np.testing.assert_allclose(half[0], full[0], rtol=1e-2)
    for field in ("W_enc", "W_dec", "b_enc", "b_dec"):
        expected, got = np.asarray(getattr(full[1], field)), np.asarray(getattr(half[1], field))
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert 0 < error < 2e-2, (field, error)  # rounded (not silently float32), and close
