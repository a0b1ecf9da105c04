"""The sparse TopK, BatchTopK and Matryoshka BatchTopK steps equal the dense ones: the selection kernels against
numpy's stable sort, values and gradients (AuxK included) against `jax.value_and_grad`
of `arch.sae_loss`, whole training steps against the dense steps, and the dense path
where the kept latents do not fit the sparse capacity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.config import TrainConfig
from gemmascope.train import arch, sparse_kernels, sparse_topk
from gemmascope.train.group import Group, dead_steps, init_state, make_train_step
from gemmascope.train.jumprelu import encode_pre
from tests.train_helpers import assert_same_trained_params

D_IN, WIDTH, BATCH, K, AUX_K = 24, 256, 160, 6, 20


def _reference_top_k(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Each row's k largest allowed scores, ties to the earlier latent, -1 after the last."""
    candidates = np.flatnonzero(allowed)
    out = np.full((scores.shape[0], k), -1, np.int32)
    for b, row in enumerate(scores):
        best = candidates[np.argsort(-row[candidates], kind="stable")[:k]]
        out[b, :best.size] = best
    return out


@pytest.mark.parametrize("share_allowed", [1.0, 0.3, 0.02])  # all latents, some, fewer than k
def test_top_k_kernel_against_numpy(share_allowed):
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((70, 300)).astype(np.float32)
    scores[:, 10:20] = scores[:, 40:50]  # ties the kernel must break towards the earlier latent
    scores[:, 100] = np.float32(3.0)
    scores[:, 7] = np.float32(3.0)
    allowed = rng.random(300) < share_allowed
    allowed[[7, 100]] = True
    slots = np.full((70, 17), 12345, np.int32)  # a result buffer as XLA hands it over: junk
    sparse_kernels.top_k(scores, allowed, slots)
    expected = _reference_top_k(scores, allowed, 17)
    np.testing.assert_array_equal(np.sort(slots, axis=1), np.sort(expected, axis=1))
    assert (slots == -1).any() == (allowed.sum() < 17)


def _reference_batch_top_k(pre: np.ndarray, keep: int) -> np.ndarray:
    """[batch, width] bool: of relu(pre) flattened, the `keep` largest (ties to the
    earlier position), and of those the positive ones."""
    activation = np.maximum(pre, 0).ravel()
    kept = np.zeros(activation.size, bool)
    kept[np.argsort(-activation, kind="stable")[:keep]] = True
    return (kept & (activation > 0)).reshape(pre.shape)


@pytest.mark.parametrize("keep", [1, 40, 700, 5000, 30000])  # a few, many ties at the cut, more than positive
def test_batch_top_k_kernel_against_numpy(keep):
    rng = np.random.default_rng(2)
    pre = np.round(rng.standard_normal((90, 300)), 1).astype(np.float32)  # coarse values: ties everywhere
    capacity = 120
    slots, most = np.full((90, capacity), 12345, np.int32), np.full((), 12345, np.int32)
    kept_minimum = np.full((), np.nan, np.float32)
    sparse_kernels.batch_top_k(pre, np.asarray(keep, np.int32), slots, most, kept_minimum)
    expected = _reference_batch_top_k(pre, keep)
    assert int(most) == expected.sum(axis=1).max()
    got = np.zeros_like(expected)
    for b, row in enumerate(slots):
        assert (row[:min(int(expected[b].sum()), capacity)] >= 0).all() and (row[expected[b].sum():] == -1).all()
        got[b, row[row >= 0]] = True
    overflowing = expected.sum(axis=1) > capacity
    np.testing.assert_array_equal(got[~overflowing], expected[~overflowing])
    assert overflowing.any() == (keep == 30000)
    assert float(kept_minimum) == np.maximum(pre, 0)[expected].min()


def test_batch_top_k_with_nothing_positive_keeps_nothing():
    pre = -np.abs(np.random.default_rng(3).standard_normal((8, 50))).astype(np.float32)
    slots, most, kept_minimum = np.zeros((8, 5), np.int32), np.zeros((), np.int32), np.zeros((), np.float32)
    sparse_kernels.batch_top_k(pre, np.asarray(16, np.int32), slots, most, kept_minimum)
    assert (slots == -1).all() and int(most) == 0 and float(kept_minimum) == np.inf


def _params_and_inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = arch.init_sae(keys[0], D_IN, WIDTH)
    params = params._replace(b_enc=0.05 * jax.random.normal(keys[1], (WIDTH,)),
                             b_dec=0.1 * jax.random.normal(keys[2], (D_IN,)))
    return params, jax.random.normal(keys[3], (BATCH, D_IN))


PREFIXES = (WIDTH // 8, WIDTH // 4, WIDTH // 2, WIDTH)  # arch.nested_prefixes(WIDTH, 4)


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead_share", [0.0, 0.05, 0.5])  # no AuxK, fewer dead than aux_k, more
def test_values_and_gradients_equal_autodiff(rule, dead_share):
    params, x = _params_and_inputs()
    dead = jax.random.uniform(jax.random.key(9), (WIDTH,)) < dead_share
    prefixes = ()
    if rule == "topk":
        chosen_rule = arch.TopK(k=K, aux_k=AUX_K, aux_coefficient=0.5)
        pairs = jax.jit(lambda p: sparse_topk.topk_pairs(p, x, K))
    elif rule == "batchtopk":
        chosen_rule = arch.BatchTopK(k=K, aux_k=AUX_K, aux_coefficient=0.5)
        pairs = jax.jit(lambda p: (pre := encode_pre(p, x), *sparse_topk.batch_topk_pairs(pre, K, WIDTH // 4)[:2]))
    else:
        chosen_rule = arch.MatryoshkaBatchTopK(k=K, prefixes=PREFIXES, aux_k=AUX_K, aux_coefficient=0.5)
        pairs = jax.jit(lambda p: (pre := encode_pre(p, x), *sparse_topk.batch_topk_pairs(pre, K, WIDTH // 4)[:2]))
        prefixes = PREFIXES
    (loss, out), grads = jax.value_and_grad(lambda p: arch.sae_loss(chosen_rule, p, x, dead), has_aux=True)(params)
    got_loss, got, got_grads, terms = jax.jit(
        lambda p: sparse_topk.value_and_grad(p, x, *pairs(p), AUX_K, 0.5, dead, prefixes))(params)
    assert (float(terms["auxk"]) > 0) == (dead_share > 0)
    np.testing.assert_allclose(terms["auxk"], out.terms["auxk"], rtol=1e-5)
    if prefixes:  # every prefix's own error, the last the full reconstruction's
        np.testing.assert_allclose(terms["prefix_mse"], out.terms["prefix_mse"], rtol=1e-5)
        assert len(np.unique(np.asarray(terms["prefix_mse"]))) == len(prefixes)
        np.testing.assert_allclose(terms["prefix_mse"][-1], out.mse, rtol=1e-5)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-5)
    for name in ("mse", "l0", "total_variance", "error_sum"):
        np.testing.assert_allclose(getattr(got, name), getattr(out, name), rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got.fired, out.fired)
    for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
        expected = np.asarray(getattr(grads, field))
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(getattr(got_grads, field), expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=field)


@pytest.mark.parametrize("rule", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_training_steps_equal_the_dense_steps(rule):
    """Five steps of a group, some latents dead from the start, with and without the
    sparse path: the same parameters and metrics, AuxK (and BatchTopK's threshold
    estimate) included."""
    params, x = _params_and_inputs(1)
    config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, lr=1e-3, lr_warmup_steps=0,
                         aux_k=AUX_K, sparse_max_density=0.25)
    group = Group.of(D_IN, [(WIDTH, K), (WIDTH, 2 * K)], [rule, rule])
    state = init_state(group, config, jax.random.key(0))
    never_fired = jnp.where(jnp.arange(WIDTH) % 7 == 0, dead_steps(config), 0).astype(jnp.int32)
    state = state._replace(params=(params, params._replace(b_enc=params.b_enc * 0.5)),
                           since_fired=(never_fired, never_fired))
    dense_step = jax.jit(make_train_step(group, config, scale=1.0))
    sparse_step = jax.jit(make_train_step(group, config, scale=1.0, use_sparse=True))
    dense_state, sparse_state = state, state
    auxk = []
    for _ in range(5):
        dense_state, dense_metrics = dense_step(dense_state, x)
        sparse_state, sparse_metrics = sparse_step(sparse_state, x)
        assert sparse_metrics["sparse_step"].all() and not dense_metrics["sparse_step"].any()
        for name in ("loss", "mse", "l0", "dead_fraction"):
            np.testing.assert_allclose(sparse_metrics[name], dense_metrics[name], rtol=1e-4, err_msg=name)
        for dense_terms, sparse_terms in zip(dense_metrics["terms"], sparse_metrics["terms"], strict=True):
            assert sparse_terms.keys() == dense_terms.keys()
            for term in sparse_terms:
                np.testing.assert_allclose(sparse_terms[term], dense_terms[term], rtol=1e-4, err_msg=term)
            auxk.append(float(dense_terms["auxk"]))
    assert auxk[0] > 0 and auxk[1] > 0  # the first step trained the dead latents through AuxK
    for dense_estimate, sparse_estimate in zip(dense_state.estimates, sparse_state.estimates, strict=True):
        np.testing.assert_allclose(sparse_estimate.value, dense_estimate.value, rtol=1e-5)
    assert len(sparse_state.estimates) == (0 if rule == "topk" else 2)
    for dense_p, sparse_p in zip(dense_state.params, sparse_state.params, strict=True):
        for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
            np.testing.assert_allclose(getattr(sparse_p, field), getattr(dense_p, field), rtol=1e-4, atol=1e-6,
                                       err_msg=field)


def test_k_beyond_the_sparse_capacity_takes_the_dense_step():
    config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, sparse_max_density=0.05)
    fits, too_many = int(0.05 * WIDTH), int(0.05 * WIDTH) + 1
    group = Group.of(D_IN, [(WIDTH, fits), (WIDTH, too_many)], ["topk", "topk"])
    state = init_state(group, config, jax.random.key(0))
    _, metrics = jax.jit(make_train_step(group, config, scale=1.0, use_sparse=True))(state, _params_and_inputs()[1])
    assert metrics["sparse_step"].tolist() == [True, False]
    np.testing.assert_allclose(metrics["l0"], [fits, too_many], rtol=0.05)


def test_a_batch_whose_busiest_row_overflows_takes_the_dense_batchtopk_step():
    """BatchTopK rows keep k on average; a row keeping more than the capacity sends the
    batch down the dense path, whose metrics the sparse path would have matched."""
    params, x = _params_and_inputs(2)
    x = x.at[0].multiply(30.0)  # one loud row takes most of the batch's budget
    config = TrainConfig(tokens=BATCH * 100, batch_size=BATCH, shuffle_rows=BATCH, sparse_max_density=0.05)
    group = Group.of(D_IN, [(WIDTH, K)], ["batchtopk"])
    state = init_state(group, config, jax.random.key(0))._replace(params=(params,))
    _, _, most, _ = sparse_topk.batch_topk_pairs(encode_pre(params, x), K, 12)
    assert int(most) > 12  # the capacity of width 256 at 5%
    sparse_state, sparse_metrics = jax.jit(make_train_step(group, config, scale=1.0, use_sparse=True))(state, x)
    dense_state, dense_metrics = jax.jit(make_train_step(group, config, scale=1.0))(state, x)
    assert not sparse_metrics["sparse_step"].any()
    np.testing.assert_allclose(sparse_metrics["loss"], dense_metrics["loss"], rtol=1e-6)
    # The dense branch continues from the encoder matmul the pair selection ran: same update.
    assert_same_trained_params(dense_state.params, sparse_state.params, state.params)
