"""The JumpReLU SAE (SPEC.md section 2) against an independent float64 numpy reference.

The reference side is written from the SPEC equations only: the forward pass, the loss,
and hand-derived straight-through gradients (rectangle kernel K(u) = 1[-1/2 < u < 1/2],
bandwidth eps). Nothing on the reference side calls gemmascope's JAX code.
`np_forward` and `np_grads` are also used by tests/test_optim_release.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.train.jumprelu import (
    JumpReLUParams,
    decode,
    encode,
    encode_pre,
    fused_loss_fn,
    init_params,
    loss_fn,
)

FIELDS = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")


# ----------------------------------------------------------------------------------------
# Independent float64 reference (SPEC.md section 2)
# ----------------------------------------------------------------------------------------

def as64(params) -> dict[str, np.ndarray]:
    """Any params (JumpReLUParams or dict) as a dict of float64 numpy arrays."""
    get = params.get if isinstance(params, dict) else lambda k: getattr(params, k)
    return {k: np.asarray(get(k), np.float64) for k in FIELDS}


def kernel(u: np.ndarray) -> np.ndarray:
    return ((u > -0.5) & (u < 0.5)).astype(np.float64)


def np_forward(p: dict, x: np.ndarray, lam: float) -> dict:
    x = np.asarray(x, np.float64)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = np.exp(p["log_threshold"])
    active = (pre > theta).astype(np.float64)  # H(pre - theta)
    f = pre * active
    x_hat = f @ p["W_dec"] + p["b_dec"]
    error = np.sum((x - x_hat) ** 2, axis=-1)
    mse = error.mean()
    l0 = active.sum(axis=-1).mean()
    total_variance = np.sum((x - x.mean(axis=0)) ** 2)
    return dict(pre=pre, theta=theta, active=active, f=f, x_hat=x_hat, mse=mse, l0=l0,
                loss=mse + lam * l0, error_sum=error.sum(), total_variance=total_variance,
                fvu=error.sum() / total_variance)


def np_grads(p: dict, x: np.ndarray, lam: float, eps: float, terms: str = "both") -> dict:
    """Hand-derived straight-through gradients of the loss.

    terms: "both", "jump" (only the JumpReLU threshold pseudo-derivative in the
    log_threshold gradient) or "l0" (only the L0 one). Other fields are unaffected:
    dH/dpre = 0, so the L0 term reaches nothing but the threshold.
    """
    x = np.asarray(x, np.float64)
    out = np_forward(p, x, lam)
    batch = x.shape[0]
    pre, theta, active, f, x_hat = (out[k] for k in ("pre", "theta", "active", "f", "x_hat"))
    g_xhat = 2.0 * (x_hat - x) / batch  # d mean_b ||x - x_hat||^2 / d x_hat
    d_W_dec = f.T @ g_xhat
    d_f = g_xhat @ p["W_dec"].T
    d_pre = d_f * active  # dJumpReLU/dpre = H(pre - theta); dH/dpre = 0
    band = kernel((pre - theta) / eps)
    d_theta_jump = np.sum(d_f * (-(theta / eps) * band), axis=0)
    d_theta_l0 = (lam / batch) * np.sum(-(1.0 / eps) * band, axis=0)
    d_theta = {"both": d_theta_jump + d_theta_l0, "jump": d_theta_jump, "l0": d_theta_l0}[terms]
    d_b_enc = d_pre.sum(axis=0)
    return {
        "W_enc": (x - p["b_dec"]).T @ d_pre,
        "b_enc": d_b_enc,
        "W_dec": d_W_dec,
        "b_dec": g_xhat.sum(axis=0) - p["W_enc"] @ d_b_enc,
        "log_threshold": d_theta * theta,  # theta = exp(log_threshold)
    }


def boundary_margin(p: dict, x: np.ndarray, eps: float) -> float:
    """Smallest distance of any pre-activation to a discontinuity (theta, theta +- eps/2).

    The float32 code and the float64 reference agree on H and K only away from these.
    """
    out = np_forward(p, x, 0.0)
    gap = out["pre"] - out["theta"]
    return float(min(np.abs(gap).min(), np.abs(np.abs(gap) - eps / 2).min()))


def max_rel_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    return float(np.abs(got - expected).max() / (scale if scale > 0 else 1.0))


def random_params(rng: np.random.Generator, d_in: int, d_sae: int, *, b_enc_scale: float,
                  b_dec_scale: float, theta_range: tuple[float, float]) -> dict[str, np.ndarray]:
    """Random SAE parameters (unit-norm decoder rows, non-zero biases), as numpy arrays."""
    W_dec = rng.normal(size=(d_sae, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)) / np.sqrt(d_in),
        "b_enc": rng.normal(size=d_sae) * b_enc_scale,
        "W_dec": W_dec,
        "b_dec": rng.normal(size=d_in) * b_dec_scale,
        "log_threshold": np.log(rng.uniform(*theta_range, size=d_sae)),
    }


def band_params(key: int, d_in: int, d_sae: int, batch: int, eps: float):
    """Random params and inputs where many pre-activations sit inside the kernel band.

    Half of the latents get theta = pre[row, j] + offset * eps with |offset| in
    [0.1, 0.4] (positive and negative): inside the band, on both sides of the jump.
    """
    rng = np.random.default_rng(key)
    p = random_params(rng, d_in, d_sae, b_enc_scale=0.1, b_dec_scale=0.1, theta_range=(0.05, 0.5))
    x = rng.normal(size=(batch, d_in)) / np.sqrt(d_in)
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    x = x.astype(np.float32).astype(np.float64)
    pre = np_forward(p, x, 0.0)["pre"]
    for j in range(0, d_sae, 2):
        # A row with a clearly positive pre-activation for latent j, plus a small offset.
        rows = np.flatnonzero(pre[:, j] > 0.05)
        if not len(rows):
            continue
        row = rows[rng.integers(len(rows))]
        offset = rng.uniform(0.1, 0.4) * rng.choice([-1.0, 1.0])
        p["log_threshold"][j] = np.log(pre[row, j] + offset * eps)
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    return p, x


def clear_band_params(seed: int, d_in: int, d_sae: int, batch: int, eps: float, margin: float = 1e-5):
    """`band_params` for the first seed from `seed` whose pre-activations all keep
    `margin` from every discontinuity (float32 rounding of pre and theta is ~1e-7, so the
    float32 code and the float64 reference then agree on every H and K)."""
    for key in range(seed, seed + 100):
        p, x = band_params(key, d_in, d_sae, batch, eps)
        if boundary_margin(p, x, eps) > margin:
            return p, x
    raise AssertionError("no seed gave a clear margin")


def to_jax(p: dict) -> JumpReLUParams:
    return JumpReLUParams(**{k: jnp.asarray(p[k], jnp.float32) for k in FIELDS})


# ----------------------------------------------------------------------------------------
# Forward, loss and diagnostics
# ----------------------------------------------------------------------------------------

D_IN, D_SAE, BATCH, EPS = 24, 64, 256, 0.02


@pytest.fixture(scope="module")
def banded():
    p, x = clear_band_params(0, D_IN, D_SAE, BATCH, EPS)
    out = np_forward(p, x, 0.0)
    in_band = np.abs(out["pre"] - out["theta"]) < EPS / 2
    # Both sides of the jump are populated inside the band.
    assert (in_band & (out["active"] > 0)).sum() >= 10
    assert (in_band & (out["active"] == 0)).sum() >= 10
    return p, x


@pytest.mark.parametrize("fn", [loss_fn, fused_loss_fn], ids=["loss_fn", "fused_loss_fn"])
@pytest.mark.parametrize("lam", [0.0, 3e-3, 0.5])
def test_loss_and_outputs_match_numpy(banded, fn, lam):
    p, x = banded
    loss, out = fn(to_jax(p), jnp.asarray(x, jnp.float32), lam, EPS)
    ref = np_forward(p, x, lam)
    assert 0 < ref["l0"] < D_SAE
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(out.loss, ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(out.mse, ref["mse"], rtol=1e-5)
    np.testing.assert_allclose(out.l0, ref["l0"], rtol=1e-6)
    np.testing.assert_allclose(out.error_sum, ref["error_sum"], rtol=1e-5)
    np.testing.assert_allclose(out.total_variance, ref["total_variance"], rtol=1e-5)
    np.testing.assert_allclose(out.error_sum / out.total_variance, ref["fvu"], rtol=1e-5)
    np.testing.assert_array_equal(out.fired, ref["active"].any(axis=0))


@pytest.mark.parametrize("fn", [loss_fn, fused_loss_fn], ids=["loss_fn", "fused_loss_fn"])
@pytest.mark.parametrize("lam", [0.0, 3e-3, 0.5])
def test_gradients_match_hand_derived_straight_through(banded, fn, lam):
    p, x = banded
    grads = jax.grad(lambda q: fn(q, jnp.asarray(x, jnp.float32), lam, EPS)[0])(to_jax(p))
    ref = np_grads(p, x, lam, EPS)
    for field in FIELDS:
        assert np.abs(ref[field]).max() > 0, field
        err = max_rel_error(getattr(grads, field), ref[field])
        assert err < 1e-4, (field, err)


def test_threshold_terms_in_isolation(banded):
    p, x = banded
    xj = jnp.asarray(x, jnp.float32)

    def grad(lam):
        return jax.grad(lambda q: loss_fn(q, xj, lam, EPS)[0])(to_jax(p))

    # lambda = 0: only the JumpReLU pseudo-derivative reaches the threshold.
    jump = np_grads(p, x, 0.0, EPS, terms="jump")["log_threshold"]
    assert np.count_nonzero(jump) >= 10
    assert max_rel_error(grad(0.0).log_threshold, jump) < 1e-4

    # Huge lambda: the L0 term dominates the threshold gradient...
    lam = 1e6
    l0_term = np_grads(p, x, lam, EPS, terms="l0")["log_threshold"]
    big = grad(lam)
    assert np.abs(l0_term).max() > 1e4 * np.abs(jump).max()
    assert max_rel_error(big.log_threshold, l0_term) < 1e-4
    # ... it pushes thresholds up (negative gradient) wherever the band is hit ...
    assert np.all(np.asarray(big.log_threshold)[l0_term != 0] < 0)
    # ... and reaches no other parameter (dH/dpre = 0).
    small = grad(0.0)
    for field in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(getattr(big, field), getattr(small, field), err_msg=field)


def test_no_band_no_threshold_gradient():
    """Pre-activations all outside the band: the threshold gradient is exactly zero."""
    p, x = band_params(1, 8, 16, 32, EPS)
    p["log_threshold"] = np.full(16, np.log(50.0))  # far above every pre-activation
    grads = jax.grad(lambda q: loss_fn(q, jnp.asarray(x, jnp.float32), 1.0, EPS)[0])(to_jax(p))
    np.testing.assert_array_equal(grads.log_threshold, 0.0)
    np.testing.assert_array_equal(grads.W_enc, 0.0)  # nothing active: no encoder gradient


# ----------------------------------------------------------------------------------------
# init_params, encode, decode
# ----------------------------------------------------------------------------------------

def test_init_params_spec():
    d_in, d_sae = 32, 128
    params = init_params(jax.random.key(7), d_in, d_sae)
    W_dec = np.asarray(params.W_dec)
    assert params.W_enc.shape == (d_in, d_sae) and W_dec.shape == (d_sae, d_in)
    assert all(getattr(params, k).dtype == jnp.float32 for k in FIELDS)
    np.testing.assert_allclose(np.linalg.norm(W_dec.astype(np.float64), axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(params.W_enc, W_dec.T)  # exactly the transpose
    np.testing.assert_array_equal(params.b_enc, np.zeros(d_sae))
    np.testing.assert_array_equal(params.b_dec, np.zeros(d_in))
    np.testing.assert_allclose(np.exp(np.asarray(params.log_threshold, np.float64)), 0.001, rtol=1e-6)
    # Deterministic for a key, different for another, rows distinct.
    again = init_params(jax.random.key(7), d_in, d_sae)
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(again, k), getattr(params, k))
    other = init_params(jax.random.key(8), d_in, d_sae)
    assert not np.allclose(other.W_dec, W_dec)
    assert len(np.unique(W_dec.round(6), axis=0)) == d_sae
    # A custom initial threshold.
    custom = init_params(jax.random.key(7), d_in, d_sae, threshold=0.25)
    np.testing.assert_allclose(np.exp(np.asarray(custom.log_threshold, np.float64)), 0.25, rtol=1e-6)
    np.testing.assert_array_equal(custom.W_dec, W_dec)


def test_init_decoder_is_normalised_uniform():
    """He-uniform rows, then unit norm: indirect checks on the direction distribution.

    Rescaling makes the He bound +-sqrt(6/d_sae) itself unobservable; what remains is
    that each row is a normalised draw from a uniform cube, so entries * sqrt(d_in) have
    mean 0, variance 1 and the kurtosis of a uniform distribution (1.8; a Gaussian
    init would give 3), and are bounded by about sqrt(3).
    """
    d_in, d_sae = 256, 1024
    W_dec = np.asarray(init_params(jax.random.key(3), d_in, d_sae).W_dec, np.float64)
    z = W_dec.ravel() * np.sqrt(d_in)
    assert abs(z.mean()) < 0.01
    assert abs(z.var() - 1.0) < 1e-3  # exact up to rounding: every row has unit norm
    kurtosis = np.mean(z**4) / np.mean(z**2) ** 2
    assert abs(kurtosis - 1.8) < 0.03, kurtosis
    assert np.abs(z).max() < np.sqrt(3) * 1.2
    # And the rows are the normalised uniform draw on +-sqrt(6/d_sae) for this key.
    bound = np.sqrt(6.0 / d_sae)
    raw = np.asarray(jax.random.uniform(jax.random.key(3), (d_sae, d_in), jnp.float32, -bound, bound),
                     np.float64)
    assert np.abs(raw).max() <= bound
    np.testing.assert_allclose(W_dec, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_encode_decode_match_numpy(banded):
    p, x = banded
    params, xj = to_jax(p), jnp.asarray(x, jnp.float32)
    ref = np_forward(p, x, 0.0)
    assert max_rel_error(encode_pre(params, xj), ref["pre"]) < 1e-5
    f = np.asarray(encode(params, xj))
    np.testing.assert_array_equal(f != 0, ref["active"] > 0)
    assert max_rel_error(f, ref["f"]) < 1e-5
    assert max_rel_error(decode(params, jnp.asarray(ref["f"], jnp.float32)), ref["x_hat"]) < 1e-5
    assert max_rel_error(decode(params, encode(params, xj)), ref["x_hat"]) < 1e-5
