"""Call a numpy kernel from a compiled JAX program on the CPU, handing it XLA's buffers.

`jax.pure_callback` first copies every operand into a new jax.Array (`device_put`) and
only then gives the callback numpy views: for the sparse step's [batch, width]
pre-activations that copy cost 0.2 s a step, more than the kernel reading them. This
primitive lowers to the same XLA host callback, minus that `device_put`, so a kernel
reads the operands as the host callback passes them. It is a primitive without
differentiation or batching rules: callers use it inside hand-written backward passes.

`emit_python_callback` is not public JAX API; where it is missing (a JAX release that
moved it) calls go through `jax.pure_callback`, slower but the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

try:
    from jax._src.callback import emit_python_callback
except ImportError:  # pragma: no cover - depends on the installed JAX
    emit_python_callback = None


class Result(NamedTuple):
    """A hashable ShapeDtypeStruct: the static parameter of the primitive."""

    shape: tuple[int, ...]
    dtype: str


_host_p = Primitive("gemmascope_host_kernel")
_host_p.multiple_results = True
_host_p.def_abstract_eval(lambda *args, kernel, results: [jax.core.ShapedArray(r.shape, np.dtype(r.dtype))
                                                          for r in results])


def _run_now(*args, kernel, results):
    """Outside a compiled program: call the kernel on the arrays themselves."""
    return [jax.numpy.asarray(out) for out in kernel(*map(np.asarray, args))]


_host_p.def_impl(_run_now)


def _lower(ctx, *operands, kernel, results):
    def run(*arrays):
        return tuple(np.asarray(out) for out in kernel(*arrays))

    outputs, _, _ = emit_python_callback(ctx, run, None, list(operands), ctx.avals_in, ctx.avals_out,
                                         has_side_effect=False, returns_token=False)
    return outputs


if emit_python_callback is not None:
    mlir.register_lowering(_host_p, _lower, platform="cpu")


def host_call(kernel: Callable[..., tuple[np.ndarray, ...]], results: list[jax.ShapeDtypeStruct],
              *args: jax.Array) -> list[jax.Array]:
    """`kernel(*numpy arrays)` -> a tuple of arrays shaped as `results`, run on the host.

    `kernel` keys the compiled program: hashable, equal for equal kernels (a function,
    or a frozen dataclass holding its static arguments).
    """
    if emit_python_callback is None:  # pragma: no cover - depends on the installed JAX
        return list(jax.pure_callback(lambda *a: kernel(*map(np.asarray, a)), tuple(results), *args))
    return _host_p.bind(*args, kernel=kernel,
                        results=tuple(Result(tuple(r.shape), np.dtype(r.dtype).name) for r in results))
