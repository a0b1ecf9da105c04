"""The release reparameterisation (SPEC.md section 2): SAEs that take raw activations.

Training sees x = x_raw / C. Folding C and the pre-encoder bias into the parameters,

    b_enc' = C*b_enc - C*(b_dec @ W_enc)    b_dec' = C*b_dec    theta' = C*theta,

gives released SAEs whose latents on x_raw are C times the training latents and whose
reconstruction is C times the training reconstruction (the raw-scale reconstruction).

A transcoder (SPEC.md 5) has no pre-encoder bias and its input and target share C, so
b_enc' = C*b_enc and the same b_dec', theta'; a skip transcoder's W_skip is unchanged
((x_raw / C) @ W_skip * C = x_raw @ W_skip) and released as a sixth array, W_skip.
"""

from __future__ import annotations

import numpy as np

from gemmascope.train.jumprelu import JumpReLUParams

RELEASE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SKIP_KEY = "W_skip"  # [d_in, d_out]: a skip transcoder's affine skip, the one extra array


def to_release(params: JumpReLUParams, scale: float, *, transcoder: bool = False) -> dict[str, np.ndarray]:
    """The five float32 arrays of a Gemma Scope params.npz; four for params without
    thresholds (a TopK SAE, whose k is kept beside its arrays); with `transcoder`, no
    pre-encoder bias to fold, and W_skip as well when the params have one."""
    W_enc = np.asarray(params.W_enc, np.float64)
    b_dec = np.asarray(params.b_dec, np.float64)
    b_enc = scale * np.asarray(params.b_enc, np.float64)
    if not transcoder:
        b_enc = b_enc - scale * (b_dec @ W_enc)
    released = {
        "W_enc": np.asarray(params.W_enc, np.float32),
        "W_dec": np.asarray(params.W_dec, np.float32),
        "b_enc": b_enc.astype(np.float32),
        "b_dec": (scale * b_dec).astype(np.float32),
    }
    if params.log_threshold is not None:
        released["threshold"] = (scale * np.exp(np.asarray(params.log_threshold, np.float64))).astype(np.float32)
    if getattr(params, SKIP_KEY, None) is not None:
        released[SKIP_KEY] = np.asarray(params.W_skip, np.float32)
    return released


def release_encode(released: dict[str, np.ndarray], x_raw: np.ndarray, k: int | None = None) -> np.ndarray:
    """Latents of released arrays on raw x: JumpReLU, or with `k` TopK (each row keeps its k
    largest pre-activations, then ReLU; a per-row rule, so the scale does not change it)."""
    pre = x_raw @ released["W_enc"] + released["b_enc"]
    if k is None:
        return pre * (pre > released["threshold"])
    kept = np.argpartition(-pre, k - 1, axis=-1)[..., :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, kept, np.maximum(np.take_along_axis(pre, kept, axis=-1), 0), axis=-1)
    return f


def release_decode(released: dict[str, np.ndarray], f: np.ndarray, x_raw: np.ndarray | None = None) -> np.ndarray:
    """The raw-scale output of latents f: f @ W_dec + b_dec, plus x_raw @ W_skip for a skip
    transcoder (which needs its input `x_raw` too)."""
    y_hat = f @ released["W_dec"] + released["b_dec"]
    if SKIP_KEY in released:
        if x_raw is None:
            raise ValueError("a skip transcoder's output needs its input x_raw")
        y_hat = y_hat + x_raw @ released[SKIP_KEY]
    return y_hat


def from_release(released: dict[str, np.ndarray], scale: float) -> JumpReLUParams:
    """The training-scale parameters of released arrays: the inverse of `to_release`."""
    W_enc = np.asarray(released["W_enc"], np.float64)
    b_dec = np.asarray(released["b_dec"], np.float64) / scale
    b_enc = np.asarray(released["b_enc"], np.float64) / scale + b_dec @ W_enc
    return JumpReLUParams(
        W_enc=np.asarray(released["W_enc"], np.float32),
        b_enc=b_enc.astype(np.float32),
        W_dec=np.asarray(released["W_dec"], np.float32),
        b_dec=b_dec.astype(np.float32),
        log_threshold=np.log(np.asarray(released["threshold"], np.float64) / scale).astype(np.float32),
    )
