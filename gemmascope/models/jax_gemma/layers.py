"""The Gemma 2 / Gemma 3 decoder layer in Flax, written from SPEC.md section 8.

Parameters keep the names and layouts of the Hugging Face checkpoints (a projection's
`weight` is `[out, in]`, norms store `w` of `x * (1 + w)`), so weights map one to one
from the safetensors files and a shape error names the tensor a user can look up.
The numerics follow transformers where it matters for parity: norms and softmax in
float32, the embedding scale rounded to the compute dtype, RoPE tables cast to it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemmascope.models.jax_gemma.architecture import GemmaArchitecture, Rope


def matmul_precision(dtype: Any) -> jax.lax.Precision:
    """float32 runs at full precision (no TF32 on GPUs), like torch's default matmul."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class Linear(nn.Module):
    """y = x W^T with W stored as `[features_out, features_in]` (the torch layout)."""

    features_in: int
    features_out: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.zeros, (self.features_out, self.features_in), self.dtype)
        return jnp.einsum("...i,oi->...o", x, weight, precision=matmul_precision(self.dtype))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + w), computed in float32 and cast back."""

    dim: int
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.zeros, (self.dim,), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rope_tables(rope: Rope, head_dim: int, length: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[length, head_dim]` of the rotate-half convention."""
    inv_freq = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / rope.linear_factor
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on `[batch, time, heads, head_dim]`: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def attention_mask(length: int, sliding_window: int | None) -> jax.Array:
    """`[query, key]` booleans: causal, and within the window on sliding layers."""
    query = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    allowed = key <= query
    if sliding_window is not None:
        allowed &= key > query - sliding_window
    return allowed


class Attention(nn.Module):
    """Grouped-query attention; returns (heads concatenated before o_proj, o_proj output)."""

    arch: GemmaArchitecture
    layer: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        a, dtype = self.arch, self.dtype
        batch, length, _ = x.shape
        q = Linear(a.d_model, a.n_heads * a.head_dim, dtype, name="q_proj")(x)
        k = Linear(a.d_model, a.n_kv_heads * a.head_dim, dtype, name="k_proj")(x)
        v = Linear(a.d_model, a.n_kv_heads * a.head_dim, dtype, name="v_proj")(x)
        q = q.reshape(batch, length, a.n_heads, a.head_dim)
        k = k.reshape(batch, length, a.n_kv_heads, a.head_dim)
        v = v.reshape(batch, length, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q = RMSNorm(a.head_dim, a.rms_norm_eps, dtype, name="q_norm")(q)
            k = RMSNorm(a.head_dim, a.rms_norm_eps, dtype, name="k_norm")(k)
        cos, sin = rope_tables(a.rope_for(self.layer), a.head_dim, length, dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)

        precision = matmul_precision(dtype)
        # Query head h reads key/value head h // kv_groups (transformers' repeat_kv order).
        q = q.reshape(batch, length, a.n_kv_heads, a.kv_groups, a.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, precision=precision) * a.query_pre_attn_scalar ** -0.5
        if a.attn_logit_softcap is not None:
            scores = jnp.tanh(scores / a.attn_logit_softcap) * a.attn_logit_softcap
        window = a.sliding_window if a.is_sliding(self.layer) else None
        scores = jnp.where(attention_mask(length, window), scores.astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        heads = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, precision=precision)
        heads = heads.reshape(batch, length, a.n_heads * a.head_dim)
        return heads, Linear(a.n_heads * a.head_dim, a.d_model, dtype, name="o_proj")(heads)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    arch: GemmaArchitecture
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = self.arch
        gate = Linear(a.d_model, a.d_ff, self.dtype, name="gate_proj")(x)
        up = Linear(a.d_model, a.d_ff, self.dtype, name="up_proj")(x)
        return Linear(a.d_ff, a.d_model, self.dtype, name="down_proj")(jax.nn.gelu(gate, approximate=True) * up)


class DecoderLayer(nn.Module):
    """One block; returns the layer output and every site of SPEC.md section 1."""

    arch: GemmaArchitecture
    layer: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        a, dtype = self.arch, self.dtype

        def norm(name: str) -> RMSNorm:
            return RMSNorm(a.d_model, a.rms_norm_eps, dtype, name=name)

        heads, attended = Attention(a, self.layer, dtype, name="self_attn")(norm("input_layernorm")(x))
        h = x + norm("post_attention_layernorm")(attended)
        mlp_in = norm("pre_feedforward_layernorm")(h)
        mlp_out = norm("post_feedforward_layernorm")(MLP(a, dtype, name="mlp")(mlp_in))
        out = h + mlp_out
        return out, {"att": heads, "mlp_in": mlp_in, "mlp": mlp_out, "res": out}
