"""Target-L0 JumpReLU SAEs and transcoders (Gemma Scope 2) take the sparse step.

The reference is autodiff of `arch.sae_loss` / `arch.transcoder_loss` with the
`arch.TargetL0JumpReLU` rule, whose threshold gradient comes from `tail_step`: the sparse
step instead differentiates the rule's penalty as a function of L0 and the firing
frequencies and spreads that over the kept pairs. The problems are set so that every part
of that gradient is non-zero: L0 off its target, latents above the frequency threshold,
rows inside the straight-through band and active rows far above it (the tail term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.config import TrainConfig
from gemmascope.train import arch, sparse
from gemmascope.train.group import Group, init_state
from gemmascope.train.jumprelu import encode_pre_matmul
from tests.train_helpers import assert_same_grads, assert_same_trained_params, train_both_ways

D_IN, D_OUT, WIDTH, BATCH, BANDWIDTH = 24, 20, 384, 128, 0.05
RULE = arch.TargetL0JumpReLU(target_l0=30.0, l0_coefficient=2.0, frequency_threshold=0.03,
                             frequency_coefficient=0.5, bandwidth=BANDWIDTH)


def _problem(transcoder: bool, skip: bool = False, fraction: float = 0.04, seed: int = 0):
    """(params, x, y or None): thresholds at each latent's (1 - fraction) quantile of pre."""
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (BATCH, D_IN))
    if transcoder:
        params = arch.init_transcoder(keys[1], D_IN, D_OUT, WIDTH, threshold=0.001, skip=skip)
        y = x @ (jax.random.normal(keys[2], (D_IN, D_OUT)) / D_IN**0.5) + 0.3 * jax.random.normal(keys[3], (BATCH, D_OUT))
        params = params._replace(b_dec=jax.random.normal(keys[4], (D_OUT,)) * 0.1,
                                 W_skip=jax.random.normal(keys[5], (D_IN, D_OUT)) * 0.1 if skip else None)
    else:
        params, y = arch.init_sae(keys[1], D_IN, WIDTH, threshold=0.001), None
        params = params._replace(b_dec=jax.random.normal(keys[4], (D_IN,)) * 0.1)
    params = params._replace(b_enc=jax.random.normal(keys[3], (WIDTH,)) * 0.05)
    pre = np.asarray(encode_pre_matmul(params, x, "float32", transcoder=transcoder))
    theta = np.maximum(np.quantile(pre, 1.0 - fraction, axis=0), 1e-3)
    return params._replace(log_threshold=jnp.log(jnp.asarray(theta, jnp.float32))), x, y


def _reference(params, x, y):
    loss = (lambda p: arch.transcoder_loss(RULE, p, x, y)) if y is not None else (lambda p: arch.sae_loss(RULE, p, x))
    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("transcoder, skip", [(False, False), (True, False), (True, True)],
                         ids=["sae", "transcoder", "skip-transcoder"])
def test_sparse_target_l0_step_equals_autodiff_of_the_rule(transcoder, skip):
    params, x, y = _problem(transcoder, skip)
    pre = encode_pre_matmul(params, x, "float32", transcoder=transcoder)
    theta = jnp.exp(params.log_threshold)
    excess = np.asarray(pre - theta)
    assert (np.abs(excess) < BANDWIDTH / 2).sum() > 20 and (excess > BANDWIDTH).sum() > 100
    chosen, needed = sparse.select(params, pre, BANDWIDTH, 64)
    assert int(needed) <= 64

    loss, out, grads, terms = jax.jit(lambda p: sparse.pairs_value_and_grad(
        p, x, y, pre, chosen, RULE.penalty, bandwidth=BANDWIDTH, tail=True))(params)
    (ref_loss, ref_out), ref_grads = _reference(params, x, y)
    assert abs(float(ref_out.l0) - RULE.target_l0) > 5 and int(ref_out.terms["dense_latents"]) > 10
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for field in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(out, field), getattr(ref_out, field), rtol=1e-5, err_msg=field)
    assert np.array_equal(out.fired, ref_out.fired)
    for name, value in ref_out.terms.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-5, err_msg=name)
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_target_l0_training_steps_equal_with_and_without_the_sparse_path(transcoder):
    """Five steps of a group of two target-L0 members: the sparse path runs and leaves the
    same parameters and terms as autodiff of the rule; with too little room it falls back."""
    params, x, y = _problem(transcoder, skip=transcoder, fraction=0.03)
    rows = jnp.concatenate([x, y], axis=1) if transcoder else x
    group = Group.of(D_IN, [(WIDTH, 30.0), (WIDTH, 60.0)], ["jumprelu_target_l0"] * 2,
                     d_out=D_OUT if transcoder else None, skips=[transcoder] * 2 if transcoder else None)
    for density, took in ((0.25, True), (0.01, False)):
        config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, lr=1e-3, lr_warmup_steps=0,
                             sparsity_warmup_steps=0, bandwidth=BANDWIDTH, sparse_max_density=density,
                             frequency_threshold=0.03)
        state = init_state(group, config, jax.random.key(0))
        fresh = state.params[0]  # the trainer's container for this architecture
        start = fresh._replace(**{field: getattr(params, field) for field in fresh._fields})
        state = state._replace(params=(start, start._replace(b_enc=start.b_enc * 0.5)))
        dense_state, dense_metrics, sparse_state, sparse_metrics = train_both_ways(group, config, state, rows)
        assert bool(sparse_metrics["sparse_step"].all()) == took and not dense_metrics["sparse_step"].any()
        for name in ("l0", "fvu", "loss"):
            np.testing.assert_allclose(sparse_metrics[name], dense_metrics[name], rtol=1e-4, err_msg=name)
        assert_same_trained_params(dense_state.params, sparse_state.params, state.params)
