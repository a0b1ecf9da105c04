"""The Gemma Scope release format (SPEC.md section 4): params.npz with five float32 arrays.

A transcoder's params.npz has the same five (W_dec [d_sae, d_out], b_dec [d_out]); a skip
transcoder's has a sixth, W_skip [d_in, d_out] (`release.SKIP_KEY`), so that no reader
can load it and silently drop the skip path.

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
from gemmascope.train.release import RELEASE_KEYS, SKIP_KEY

_EPOCH = (1980, 1, 1, 0, 0, 0)
TRANSCODER_WIDTH = "from W_dec"  # as `d_out`: a transcoder of whatever output width its W_dec has


def width_folder(width: int) -> str:
    """`width_16k` ... `width_1m`, the release's folder names."""
    return f"width_{width_label(width)}"


def release_dir(site: str, layer: int, width: int, l0: float) -> str:
    """`<site>/layer_<L>/width_<W>/average_l0_<K>`, K the measured L0 rounded."""
    return f"{site}/layer_{layer}/{width_folder(width)}/average_l0_{int(round(l0))}"


def release_names(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The arrays a params.npz holds, in file order: the five, and W_skip when there is one."""
    return RELEASE_KEYS + ((SKIP_KEY,) if SKIP_KEY in arrays else ())


def check_arrays(arrays: dict[str, np.ndarray], where: str, *, d_out: int | str | None = None) -> tuple[int, int]:
    """(d_in, d_sae) of a valid set of release arrays; one-line errors otherwise. The output
    width is d_in (an SAE) unless `d_out` says otherwise (a transcoder: its width, or
    TRANSCODER_WIDTH when the file is the only record of it) or W_skip is there."""
    names = sorted(arrays)
    if names != sorted(release_names(arrays)):
        raise UserError(f"{where}: expected arrays {', '.join(RELEASE_KEYS)} (and {SKIP_KEY} for a skip "
                        f"transcoder), found {', '.join(names)}")
    for name in names:
        if arrays[name].dtype != np.float32:
            raise UserError(f"{where}: {name} is {arrays[name].dtype}, expected float32")
    for name in ("W_enc", "W_dec"):
        if arrays[name].ndim != 2:
            raise UserError(f"{where}: {name} has shape {arrays[name].shape}, expected 2 dimensions")
    d_in, d_sae = arrays["W_enc"].shape
    if d_out == TRANSCODER_WIDTH or (d_out is None and SKIP_KEY in arrays):
        d_out = arrays["W_dec"].shape[1]
    elif d_out is None:
        d_out = d_in
    expected = {"W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,),
                SKIP_KEY: (d_in, d_out)}
    for name, shape in ((name, shape) for name, shape in expected.items() if name in arrays):
        if arrays[name].shape != shape:
            raise UserError(f"{where}: {name} has shape {arrays[name].shape}, expected {shape}")
    return d_in, d_sae


def params_npz_bytes(arrays: dict[str, np.ndarray], *, d_out: int | str | None = None) -> bytes:
    """A params.npz, byte for byte the same for the same arrays (`d_out`: a transcoder's)."""
    check_arrays(arrays, "params.npz", d_out=d_out)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in release_names(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def read_params_npz(data: bytes, where: str, *, d_out: int | str | None = None) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{where}: not a params.npz ({err})") from None
    check_arrays(arrays, where, d_out=d_out)
    return arrays


def load_params_npz(url: str, *, d_out: int | None = None) -> dict[str, np.ndarray]:
    """Read and check the params.npz at `url` (local or gs://); `d_out`: a transcoder's output width."""
    return read_params_npz(storage.read_bytes(url), url, d_out=d_out)
