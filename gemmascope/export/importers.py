"""Load a released SAE from either published format, to evaluate it, show it, or start from it.

A Gemma Scope folder holds params.npz (its site, layer and width come from the folder
names when they follow the release layout); a SAELens folder holds
sae_weights.safetensors and cfg.json (site and layer from its hook name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import load_params_npz
from gemmascope.export.saelens import CFG, WEIGHTS, read_saelens

_RELEASE_PATH = re.compile(r"(?:^|/)([a-z_]+)/layer_(\d+)/width_[0-9]+[km]?/average_l0_\d+[^/]*/?$")


@dataclass(frozen=True)
class ImportedSAE:
    arrays: dict[str, np.ndarray]  # the five release arrays (raw activations in, raw reconstruction out)
    site: str | None
    layer: int | None
    format: str  # "gemma-scope" or "saelens"


def load_released(location: str) -> ImportedSAE:
    """The SAE in `location` (a folder, local or gs://, or a params.npz file)."""
    location = storage.normalize(location)
    if location.endswith(".npz"):
        location = location.rsplit("/", 1)[0]
    npz = storage.join(location, "params.npz")
    if storage.exists(npz):
        arrays = load_params_npz(npz)
        match = _RELEASE_PATH.search(location)
        site, layer = (match.group(1), int(match.group(2))) if match else (None, None)
        return ImportedSAE(arrays, site, layer, "gemma-scope")
    weights, cfg = storage.join(location, WEIGHTS), storage.join(location, CFG)
    if storage.exists(weights) and storage.exists(cfg):
        arrays, site, layer = read_saelens(storage.read_bytes(weights), storage.read_bytes(cfg), location)
        return ImportedSAE(arrays, site, layer, "saelens")
    raise UserError(f"{location}: no SAE here (expected params.npz, or {WEIGHTS} with {CFG})")
