"""Call a numpy kernel from a compiled JAX program on the CPU, on XLA's own buffers.

`jax.pure_callback` copies every operand twice (into a numpy array, then into a new
jax.Array) and every result once more into XLA's buffer: for the sparse step, with its
[batch, width] pre-activations, decoder weights and two weight gradients, those copies
cost more than half a second a step, more than the kernels themselves. Here each kernel
is an XLA FFI target (`jax.ffi`), a C function pointer made with ctypes: XLA hands it
the addresses of its operand and result buffers, the kernel reads the operands and
writes the results in place, and nothing is copied.

The handler follows XLA's FFI C API (xla/ffi/api/c_api.h): a call frame carrying the
API table, the execution stage and the argument and result buffers; a first call with
a metadata extension asks which API version the handler speaks. A kernel that raises
becomes an XLA error, so the step fails with the kernel's message instead of going on
with unwritten results.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)

_METADATA_EXTENSION = 1
_EXECUTE_STAGE = 3
_ERROR_INTERNAL = 13
_DTYPES = {1: np.bool_, 4: np.int32, 5: np.int64, 11: np.float32, 12: np.float64}


class _Extension(ctypes.Structure):
    pass


_Extension._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                       ("next", ctypes.POINTER(_Extension))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Buffers(ctypes.Structure):
    """XLA_FFI_Args and XLA_FFI_Rets, which share this layout."""

    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("buffers", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.c_void_p), ("names", ctypes.c_void_p), ("attrs", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _ErrorArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("code", ctypes.c_int)]


class _Api(ctypes.Structure):
    """The head of XLA_FFI_Api: its version and the first function, XLA_FFI_Error_Create."""

    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("version", _Version),
                ("internal_api", ctypes.c_void_p),
                ("error_create", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorArgs)))]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("version", _Version), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("base", _Extension), ("metadata", ctypes.POINTER(_Metadata))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_Extension)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _Buffers), ("rets", _Buffers), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


_Handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


def _view(address: int) -> np.ndarray:
    """The numpy array over an XLA_FFI_Buffer's memory (no copy)."""
    buffer = ctypes.cast(address, ctypes.POINTER(_Buffer)).contents
    dtype = np.dtype(_DTYPES[buffer.dtype])
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.frombuffer((ctypes.c_char * nbytes).from_address(buffer.data), dtype).reshape(shape)


def _handler(kernel: Callable[..., None]) -> _Handler:
    name = getattr(kernel, "__name__", repr(kernel))

    def handle(frame_pointer):
        frame = frame_pointer.contents
        if frame.extension_start and frame.extension_start.contents.type == _METADATA_EXTENSION:
            metadata = ctypes.cast(frame.extension_start, ctypes.POINTER(_MetadataExtension)).contents.metadata
            metadata.contents.version.major = frame.api.contents.version.major
            metadata.contents.version.minor = frame.api.contents.version.minor
            metadata.contents.traits = 0
            return None
        if frame.stage != _EXECUTE_STAGE:
            return None
        try:
            arrays = [_view(frame.args.buffers[i]) for i in range(frame.args.size)]
            outputs = [_view(frame.rets.buffers[i]) for i in range(frame.rets.size)]
            kernel(*arrays, *outputs)
        except Exception as err:  # noqa: BLE001 - handed to XLA, which raises it in the caller
            log.exception("host kernel %s failed", name)
            message = f"{name}: {type(err).__name__}: {err}".encode()
            args = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, message, _ERROR_INTERNAL)
            return frame.api.contents.error_create(ctypes.byref(args))
        return None

    return _Handler(handle)


_REGISTERED: dict[str, _Handler] = {}  # also keeps each handler alive while XLA may call it


def register(name: str, kernel: Callable[..., None]) -> None:
    """Make `kernel(*operands, *results)`, which writes its results in place, callable as
    `host_call(name, ...)`; registering a name twice keeps the first kernel."""
    if name in _REGISTERED:
        return
    _REGISTERED[name] = _handler(kernel)
    jax.ffi.register_ffi_target(f"gemmascope_{name}", jax.ffi.pycapsule(_REGISTERED[name]), platform="cpu")


def host_call(name: str, results: list[jax.ShapeDtypeStruct], *args: jax.Array) -> list[jax.Array]:
    """Run the kernel registered as `name` on the CPU; `results` its outputs' shapes."""
    return list(jax.ffi.ffi_call(f"gemmascope_{name}", list(results))(*args))
