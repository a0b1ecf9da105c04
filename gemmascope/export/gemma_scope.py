"""The Gemma Scope release format (SPEC.md section 4): params.npz with five float32 arrays.

Files are written deterministically (fixed zip timestamps, fixed member order), so
exporting the same SAE twice, or importing and exporting it again, gives identical bytes.
Reading never unpickles: `np.load(..., allow_pickle=False)` and a check of every name,
shape and dtype, so a foreign or damaged file fails with one line naming it.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.sweep.grid import width_label
from gemmascope.train.release import RELEASE_KEYS

_EPOCH = (1980, 1, 1, 0, 0, 0)


def width_folder(width: int) -> str:
    """`width_16k` ... `width_1m`, the release's folder names."""
    return f"width_{width_label(width)}"


def release_dir(site: str, layer: int, width: int, l0: float) -> str:
    """`<site>/layer_<L>/width_<W>/average_l0_<K>`, K the measured L0 rounded."""
    return f"{site}/layer_{layer}/{width_folder(width)}/average_l0_{int(round(l0))}"


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> tuple[int, int]:
    """(d_in, d_sae) of a valid set of release arrays; one-line errors otherwise."""
    names = sorted(arrays)
    if names != sorted(RELEASE_KEYS):
        raise UserError(f"{where}: expected arrays {', '.join(RELEASE_KEYS)}, found {', '.join(names)}")
    for name in RELEASE_KEYS:
        if arrays[name].dtype != np.float32:
            raise UserError(f"{where}: {name} is {arrays[name].dtype}, expected float32")
    if arrays["W_enc"].ndim != 2:
        raise UserError(f"{where}: W_enc has shape {arrays['W_enc'].shape}, expected [d_in, d_sae]")
    d_in, d_sae = arrays["W_enc"].shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise UserError(f"{where}: {name} has shape {arrays[name].shape}, expected {shape}")
    return d_in, d_sae


def params_npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A params.npz, byte for byte the same for the same arrays."""
    check_arrays(arrays, "params.npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in RELEASE_KEYS:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def read_params_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{where}: not a params.npz ({err})") from None
    check_arrays(arrays, where)
    return arrays


def load_params_npz(url: str) -> dict[str, np.ndarray]:
    """Read and check the params.npz at `url` (local or gs://)."""
    return read_params_npz(storage.read_bytes(url), url)
