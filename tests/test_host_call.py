"""Host kernels run on XLA's own buffers: the operands they see are the program's
arrays (same address, no copy), their in-place results come back, and a kernel that
raises fails the call with its message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemmascope.train.host_call import host_call, register

seen: dict[str, int] = {}


def scale_and_total(values: np.ndarray, factor: np.ndarray, scaled: np.ndarray, total: np.ndarray) -> None:
    seen["address"] = values.ctypes.data
    np.multiply(values, factor, out=scaled)
    total[()] = values.sum(dtype=np.float64)


def refuses(values: np.ndarray, out: np.ndarray) -> None:
    raise ValueError(f"no rows in a {values.shape} batch")


register("test_scale_and_total", scale_and_total)
register("test_refuses", refuses)


def test_results_written_in_place_from_the_operands_own_memory():
    values = jnp.asarray(np.random.default_rng(0).standard_normal((300, 7)), jnp.float32)
    scaled, total = host_call("test_scale_and_total", [jax.ShapeDtypeStruct((300, 7), jnp.float32),
                                                        jax.ShapeDtypeStruct((), jnp.float32)],
                              values, jnp.float32(2.5))
    np.testing.assert_allclose(scaled, np.asarray(values) * 2.5, rtol=1e-6)
    np.testing.assert_allclose(total, np.asarray(values, np.float64).sum(), rtol=1e-5)
    assert seen["address"] == values.unsafe_buffer_pointer()  # the kernel read the array itself

    inside = jax.jit(lambda v: jax.lax.cond(v.sum() > -1e9, lambda v: host_call(
        "test_scale_and_total", [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((), v.dtype)],
        v * 2, jnp.float32(0.5))[0], lambda v: v * 0, v))
    np.testing.assert_allclose(inside(values), np.asarray(values), rtol=1e-6)  # (2v) * 0.5, inside cond and jit


def test_a_failing_kernel_fails_the_call_with_its_message():
    call = jax.jit(lambda v: host_call("test_refuses", [jax.ShapeDtypeStruct(v.shape, v.dtype)], v)[0])
    with pytest.raises(Exception, match=r"refuses: ValueError: no rows in a \(3, 2\) batch"):
        jax.block_until_ready(call(jnp.ones((3, 2))))
