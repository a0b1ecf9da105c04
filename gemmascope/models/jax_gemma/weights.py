"""Read Hugging Face safetensors checkpoints into the Flax parameter tree, checked by name.

The files are parsed here (an 8-byte header length, a JSON header, raw little-endian
data) and memory-mapped, so reading needs neither torch nor pickle, bfloat16 tensors
arrive as `ml_dtypes.bfloat16` bit for bit, and only the layers a harvest runs are read.
Every expected tensor is checked before anything is placed on a device: a missing one
or a wrong shape is one line naming the tensor and the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from gemmascope.errors import UserError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class TensorEntry:
    """Where one tensor's bytes are: file, dtype, shape, byte range."""

    def __init__(self, path: Path, name: str, meta: Mapping[str, Any], data_start: int):
        self.path, self.name = path, name
        dtype = meta.get("dtype")
        if dtype not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {dtype!r} (supported: {', '.join(DTYPES)})")
        self.dtype = DTYPES[dtype]
        self.shape = tuple(int(n) for n in meta["shape"])
        begin, end = (int(n) for n in meta["data_offsets"])
        if end - begin != self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64)):
            raise UserError(f"{path}: tensor {name}: byte range {begin}..{end} does not hold shape {list(self.shape)}")
        self.offset, self.nbytes = data_start + begin, end - begin

    def read(self) -> np.ndarray:
        """A read-only memory map of the tensor (pages are read as they are used)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise UserError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable safetensors header ({err})") from None
    size = path.stat().st_size
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        entry = TensorEntry(path, name, meta, 8 + length)
        if entry.offset + entry.nbytes > size:
            raise UserError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
        entries[name] = entry
    return entries


def checkpoint_tensors(directory: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint directory (one file, or shards listed by an index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise UserError(f"{directory}: cannot load safetensors weights: no {SINGLE_FILE} or {INDEX_FILE}")
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        if not (directory / file).is_file():
            raise UserError(f"{directory / file}: listed in {INDEX_FILE} but missing")
        tensors.update(_read_header(directory / file))
    return tensors


def hf_name(path: tuple[str, ...]) -> str:
    """('layers_3', 'mlp', 'up_proj', 'weight') -> 'model.layers.3.mlp.up_proj.weight'."""
    parts = []
    for part in path:
        prefix, _, number = part.rpartition("_")
        parts.extend([prefix, number] if prefix == "layers" and number.isdigit() else [part])
    return "model." + ".".join(parts)


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def check_tensors(directory: Path, expected: Mapping[str, Any]) -> dict[str, TensorEntry]:
    """The checkpoint's tensors, after checking every expected one exists with its shape."""
    tensors = checkpoint_tensors(directory)
    for path, spec in flatten_tree(expected).items():
        name = hf_name(path)
        entry = tensors.get(name)
        if entry is None:
            raise UserError(f"{directory}: tensor {name} is missing from the checkpoint")
        if entry.shape != tuple(spec.shape):
            raise UserError(f"{entry.path}: tensor {name} has shape {list(entry.shape)}, "
                            f"expected {list(spec.shape)} from config.json")
    return tensors


def load_params(directory: Path, expected: Mapping[str, Any], dtype: Any,
                place: Callable[[tuple[str, ...], np.ndarray], Any]) -> dict[str, Any]:
    """The parameter tree shaped like `expected` (a tree of ShapeDtypeStructs), read from
    `directory`, cast to `dtype`, each leaf handed to `place(path, array)` (device_put
    with its sharding) as soon as it is read, so host memory holds one tensor at a time."""
    tensors = check_tensors(directory, expected)
    placed = {path: place(path, tensors[hf_name(path)].read().astype(dtype, copy=False))
              for path in flatten_tree(expected)}
    return unflatten_tree(placed)
