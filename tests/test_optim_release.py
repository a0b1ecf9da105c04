"""Optimiser, schedules, decoder constraint, release reparameterisation and the grouped
training step (SPEC.md section 2), against independent numpy references.

The references are written from the SPEC equations; the JumpReLU forward pass and
hand-derived gradients come from tests/test_jumprelu.py (numpy, float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemmascope.config import TrainConfig
from gemmascope.train.group import Group, TrainState, build_optimizer, init_state, make_train_step
from gemmascope.train.jumprelu import JumpReLUParams
from gemmascope.train.optim import (
    remove_parallel_component,
    scale_by_adam_without_momentum,
    sparsity_schedule,
    unit_rows,
    warmup_schedule,
)
from gemmascope.train.release import RELEASE_KEYS, release_decode, release_encode, to_release
from tests.test_jumprelu import FIELDS, as64, max_rel_error, np_forward, np_grads, random_params

# ----------------------------------------------------------------------------------------
# Adam without momentum
# ----------------------------------------------------------------------------------------


def test_adam_without_momentum_equals_optax_adam_b1_zero():
    lr, steps = 1e-3, 20
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(11,)), jnp.float32)}
    ours = optax.chain(scale_by_adam_without_momentum(b2=0.999, eps=1e-8), optax.scale(-lr))
    reference = optax.adam(lr, b1=0.0, b2=0.999, eps=1e-8)
    p_ours, p_ref = params, params
    s_ours, s_ref = ours.init(params), reference.init(params)
    worst = 0.0
    for _ in range(steps):
        # Gradients of very different scales per step, some exactly zero.
        scale = 10.0 ** rng.uniform(-4, 1)
        grads = {k: jnp.asarray(rng.normal(size=v.shape) * scale * (rng.random(v.shape) > 0.1),
                                jnp.float32) for k, v in params.items()}
        u_ours, s_ours = ours.update(grads, s_ours, p_ours)
        u_ref, s_ref = reference.update(grads, s_ref, p_ref)
        for k in params:
            np.testing.assert_allclose(u_ours[k], u_ref[k], rtol=2e-6, atol=1e-12)
            worst = max(worst, max_rel_error(u_ours[k], u_ref[k]))
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
    for k in params:
        np.testing.assert_allclose(p_ours[k], p_ref[k], rtol=1e-6, atol=1e-7)
    assert worst < 1e-6


def test_adam_without_momentum_first_step_numpy():
    """Step 1: nu = (1 - b2) g^2, corrected by 1 - b2: the update is g / (|g| + eps)."""
    b2, eps = 0.999, 1e-8
    g = np.array([1.0, -2e-3, 3e-9, 0.0, -5.0], np.float32)
    tx = scale_by_adam_without_momentum(b2, eps)
    updates, state = tx.update(jnp.asarray(g), tx.init(jnp.zeros(5)))
    nu = (1 - b2) * g.astype(np.float64) ** 2
    np.testing.assert_allclose(state.nu, nu, rtol=1e-6)
    np.testing.assert_allclose(updates, g / (np.sqrt(nu / (1 - b2)) + eps), rtol=1e-5)
    assert int(state.count) == 1


# ----------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------

def np_lr(peak: float, warmup: int, t: int) -> float:
    """SPEC: cosine warm-up from 0.1*peak to peak over `warmup` steps, then constant."""
    return peak * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * min(t / warmup, 1.0))))


def value(schedule, t) -> float:
    return float(schedule(jnp.asarray(t, jnp.int32)))


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_warmup_schedule(decay):
    peak, warmup, total = 2e-3, 100, 1000
    s = warmup_schedule(peak, warmup, total, decay)
    assert value(s, 0) == pytest.approx(0.1 * peak, rel=1e-6)
    assert value(s, warmup // 2) == pytest.approx(peak * (0.1 + 0.9 * 0.5), rel=1e-6)
    assert value(s, warmup // 4) == pytest.approx(np_lr(peak, warmup, warmup // 4), rel=1e-6)
    assert value(s, warmup) == pytest.approx(peak, rel=1e-6)
    values = [value(s, t) for t in range(warmup + 1)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))  # increasing warm-up
    if decay == "none":
        for t in (warmup + 1, 500, total, 5 * total):
            assert value(s, t) == pytest.approx(peak, rel=1e-6)
    else:
        middle = warmup + (total - warmup) // 2
        assert value(s, middle) == pytest.approx(0.5 * peak, rel=1e-5)
        quarter = warmup + (total - warmup) // 4
        assert value(s, quarter) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
        assert value(s, total) == pytest.approx(0.0, abs=1e-12)
        assert value(s, 2 * total) == pytest.approx(0.0, abs=1e-12)
        decaying = [value(s, t) for t in range(warmup, total + 1, 50)]
        assert all(a > b for a, b in zip(decaying, decaying[1:], strict=False))


def test_sparsity_schedule():
    n = 10
    s = sparsity_schedule(n)
    assert value(s, 0) == 0.0
    assert value(s, n // 2) == pytest.approx(0.5)
    assert value(s, 3) == pytest.approx(0.3)
    assert value(s, n) == pytest.approx(1.0)
    assert value(s, 10 * n) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------
# Decoder constraint
# ----------------------------------------------------------------------------------------

def test_remove_parallel_component_and_unit_rows():
    rng = np.random.default_rng(1)
    W = rng.normal(size=(40, 12)) * rng.uniform(0.1, 10, size=(40, 1))
    rows = np.asarray(unit_rows(jnp.asarray(W, jnp.float32)), np.float64)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(rows, W / np.linalg.norm(W, axis=1, keepdims=True), atol=1e-6)

    grad = rng.normal(size=(40, 12))
    projected = np.asarray(remove_parallel_component(jnp.asarray(grad, jnp.float32),
                                                     jnp.asarray(rows, jnp.float32)), np.float64)
    # Orthogonal to each row, and the orthogonal part of the gradient is unchanged.
    assert np.abs(np.sum(projected * rows, axis=1)).max() < 1e-5
    expected = grad - np.sum(grad * rows, axis=1, keepdims=True) * rows
    np.testing.assert_allclose(projected, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Release reparameterisation
# ----------------------------------------------------------------------------------------

def test_release_reparameterisation():
    C, d_in, d_sae, batch = 37.5, 16, 64, 200
    rng = np.random.default_rng(2)
    train = random_params(rng, d_in, d_sae, b_enc_scale=0.2, b_dec_scale=0.3, theta_range=(0.02, 0.4))
    train = {k: v.astype(np.float32) for k, v in train.items()}
    x_raw = (rng.normal(size=(batch, d_in)) * C / np.sqrt(d_in)).astype(np.float32)

    released = to_release(JumpReLUParams(**{k: jnp.asarray(v) for k, v in train.items()}), C)
    assert set(released) == set(RELEASE_KEYS)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
              "b_dec": (d_in,), "threshold": (d_sae,)}
    for k, shape in shapes.items():
        assert isinstance(released[k], np.ndarray) and released[k].dtype == np.float32, k
        assert released[k].shape == shape, k
    p64 = as64(train)
    # The SPEC formulas, in float64.
    np.testing.assert_allclose(released["b_enc"], C * p64["b_enc"] - C * (p64["b_dec"] @ p64["W_enc"]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(released["b_dec"], C * p64["b_dec"], rtol=1e-6)
    np.testing.assert_allclose(released["threshold"], C * np.exp(p64["log_threshold"]), rtol=1e-6)
    np.testing.assert_array_equal(released["W_enc"], train["W_enc"])
    np.testing.assert_array_equal(released["W_dec"], train["W_dec"])

    ref = np_forward(p64, x_raw.astype(np.float64) / C, 0.0)
    gap = np.abs(ref["pre"] - ref["theta"])
    assert gap.min() > 1e-5  # no pre-activation at a threshold: float32 agrees on H
    assert 0 < ref["l0"] < d_sae / 2 and ref["active"].any(axis=0).sum() > d_sae // 4

    f = release_encode(released, x_raw)
    np.testing.assert_array_equal(f != 0, ref["active"] > 0)
    assert max_rel_error(f, C * ref["f"]) < 1e-5
    x_hat = release_decode(released, f)
    assert max_rel_error(x_hat, C * ref["x_hat"]) < 1e-5
    # The released SAE reconstructs raw activations about as well as the trained one did.
    raw_fvu = np.sum((x_raw - x_hat) ** 2) / np.sum((x_raw - x_raw.mean(axis=0)) ** 2)
    assert raw_fvu == pytest.approx(ref["fvu"], rel=1e-4)


# ----------------------------------------------------------------------------------------
# The grouped training step
# ----------------------------------------------------------------------------------------

GROUP = Group.of(16, [(32, 0.0), (32, 1e-2), (48, 1e-3)])
CONFIG = TrainConfig(tokens=64 * 100, batch_size=64, shuffle_rows=64, lr=1e-3, lr_warmup_steps=2,
                     sparsity_warmup_steps=4, threshold_lr=2e-2)
SCALE = 2.0
STEPS = 6


def batches(n: int) -> list[np.ndarray]:
    """Raw batches with E||x_raw / SCALE||^2 ~ 1, a dense-ish mix of directions."""
    rng = np.random.default_rng(3)
    return [(rng.normal(size=(CONFIG.batch_size, GROUP.d_in)) * SCALE / 4.0
             + 0.3 * SCALE / 4.0).astype(np.float32) for _ in range(n)]


class NumpySAE:
    """One SAE trained by the SPEC recipe in float64: projected decoder gradient, Adam
    (beta1 = 0) with the warm-up learning rate(s), renormalised decoder rows."""

    def __init__(self, params: JumpReLUParams, sparsity: float, config: TrainConfig):
        self.p = as64(params)
        self.sparsity, self.config = sparsity, config
        self.nu = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.t = 0  # the state's step counter

    def lr(self, field: str) -> float:
        peak = self.config.threshold_lr if field == "log_threshold" else self.config.lr
        return np_lr(peak, self.config.lr_warmup_steps, self.t)

    def step(self, x_raw: np.ndarray) -> dict:
        c = self.config
        x = x_raw.astype(np.float64) / SCALE
        lam = self.sparsity * min(self.t / c.sparsity_warmup_steps, 1.0)
        out = np_forward(self.p, x, lam)
        g = np_grads(self.p, x, lam, c.bandwidth)
        W = self.p["W_dec"]
        g["W_dec"] = g["W_dec"] - np.sum(g["W_dec"] * W, axis=1, keepdims=True) * W
        correction = 1.0 - c.adam_beta2 ** (self.t + 1)
        for k in FIELDS:
            self.nu[k] = c.adam_beta2 * self.nu[k] + (1 - c.adam_beta2) * g[k] ** 2
            update = g[k] / (np.sqrt(self.nu[k] / correction) + c.adam_eps)
            self.p[k] = self.p[k] - self.lr(k) * update
        self.p["W_dec"] /= np.linalg.norm(self.p["W_dec"], axis=1, keepdims=True)
        self.t += 1
        return dict(out, lam=lam, grads=g)


def band_count(p: dict, x_raw: np.ndarray, eps: float) -> tuple[int, float]:
    """(pre-activations inside the kernel band, distance of the closest one to a
    discontinuity of H or K)."""
    out = np_forward(p, x_raw.astype(np.float64) / SCALE, 0.0)
    gap = out["pre"] - out["theta"]
    margin = min(np.abs(gap).min(), np.abs(np.abs(gap) - eps / 2).min())
    return int((np.abs(gap) < eps / 2).sum()), float(margin)


@pytest.fixture(scope="module")
def group_run():
    """The group trained for STEPS steps: (states before each step, metrics of each step)."""
    step = jax.jit(make_train_step(GROUP, CONFIG, scale=SCALE))
    state = init_state(GROUP, CONFIG, jax.random.key(0))
    states, metrics = [state], []
    for x_raw in batches(STEPS):
        state, m = step(state, jnp.asarray(x_raw))
        states.append(state)
        metrics.append(jax.device_get(m))
    return states, metrics


def test_optax_schedule_sees_the_update_count_from_zero():
    """optax.scale_by_learning_rate evaluates the schedule at the count *before* the
    update (0 on the first one), the same index as TrainState.step: no offset by one."""
    seen = []
    tx = optax.scale_by_learning_rate(lambda count: (seen.append(count), 1.0)[1])
    state = tx.init(jnp.zeros(2))
    for _ in range(3):
        _, state = tx.update(jnp.ones(2), state)
    assert [int(c) for c in seen] == [0, 1, 2]


def test_group_first_step_matches_numpy(group_run):
    states, metrics = group_run
    state0, state1 = states[0], states[1]
    assert int(state0.step) == 0 and int(state1.step) == 1
    x_raw = batches(1)[0]
    m = metrics[0]
    assert m["sparsity_factor"] == 0.0  # lambda is warmed up from 0 at step 0
    assert m["lr"] == pytest.approx(0.1 * CONFIG.lr, rel=1e-6)  # lr(0) = 0.1 * lr
    for i, (_, sparsity) in enumerate(GROUP.saes):
        ref_sae = NumpySAE(state0.params[i], sparsity, CONFIG)
        out = ref_sae.step(x_raw)
        assert out["lam"] == 0.0
        got = state1.params[i]
        for k in FIELDS:
            assert max_rel_error(getattr(got, k), ref_sae.p[k]) < 1e-5, (i, k)
        # First Adam step: |update| = lr(0) * |g| / (|g| + eps) ~ lr(0) for non-zero g.
        step_b_enc = np.abs(np.asarray(got.b_enc, np.float64) - as64(state0.params[i])["b_enc"])
        moved = np.abs(out["grads"]["b_enc"]) > 1e-5
        assert moved.any()
        np.testing.assert_allclose(step_b_enc[moved], 0.1 * CONFIG.lr, rtol=1e-2)
        np.testing.assert_allclose(np.linalg.norm(np.asarray(got.W_dec, np.float64), axis=1), 1.0,
                                   atol=1e-6)
        np.testing.assert_allclose(m["loss"][i], out["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["mse"][i], out["mse"], rtol=1e-5)
        np.testing.assert_allclose(m["l0"][i], out["l0"], rtol=1e-6)
        np.testing.assert_allclose(m["fvu"][i], out["fvu"], rtol=1e-5)
        np.testing.assert_array_equal(state1.since_fired[i],
                                      np.where(out["active"].any(axis=0), 0, 1))


def test_group_trajectory_matches_numpy(group_run):
    """Every SAE of the group follows the float64 recipe for STEPS steps: lr and lambda
    warm-ups indexed by the step counter, threshold_lr for the thresholds."""
    states, metrics = group_run
    xs = batches(STEPS)
    in_band = 0
    for i, (_, sparsity) in enumerate(GROUP.saes):
        ref_sae = NumpySAE(states[0].params[i], sparsity, CONFIG)
        for t, x_raw in enumerate(xs):
            count, margin = band_count(ref_sae.p, x_raw, CONFIG.bandwidth)
            assert margin > 1e-6, (i, t, margin)
            in_band += count
            out = ref_sae.step(x_raw)
            assert out["lam"] == pytest.approx(sparsity * min(t / CONFIG.sparsity_warmup_steps, 1.0))
            assert metrics[t]["sparsity_factor"] == pytest.approx(min(t / CONFIG.sparsity_warmup_steps, 1))
            assert metrics[t]["lr"] == pytest.approx(np_lr(CONFIG.lr, CONFIG.lr_warmup_steps, t), rel=1e-6)
            np.testing.assert_allclose(metrics[t]["loss"][i], out["loss"], rtol=1e-4)
            np.testing.assert_allclose(metrics[t]["l0"][i], out["l0"], rtol=1e-6)
            got = states[t + 1].params[i]
            for k in FIELDS:
                err = max_rel_error(getattr(got, k), ref_sae.p[k])
                assert err < 5e-5, (i, t, k, err)
    assert in_band > 0  # the threshold pseudo-derivatives took part


def test_group_members_train_as_if_alone(group_run):
    states, _ = group_run
    xs = batches(STEPS)
    for i, sae in enumerate(GROUP.saes):
        alone = Group.of(GROUP.d_in, [sae])
        params = (states[0].params[i],)
        state = TrainState(params, build_optimizer(CONFIG).init(params), jnp.zeros([], jnp.int32),
                           (jnp.zeros(sae[0], jnp.int32),))
        step = jax.jit(make_train_step(alone, CONFIG, scale=SCALE))
        for t, x_raw in enumerate(xs):
            state, _ = step(state, jnp.asarray(x_raw))
            for k in FIELDS:
                expected = getattr(states[t + 1].params[i], k)
                err = max_rel_error(getattr(state.params[0], k), expected)
                assert err < 1e-6, (i, t, k, err)
            np.testing.assert_array_equal(state.since_fired[0], states[t + 1].since_fired[i])
