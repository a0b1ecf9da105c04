"""Load a released SAE from either published format, to evaluate it, show it, or start from it.

A Gemma Scope folder holds params.npz (its site, layer and width come from the folder
names when they follow the release layout); a SAELens folder holds
sae_weights.safetensors and cfg.json (site and layer from its hook name).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import load_params_npz, params_npz_bytes
from gemmascope.export.saelens import CFG, WEIGHTS, read_saelens
from gemmascope.sweep.grid import width_label

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # not ".", "..": the name is a folder under RUN/imported
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


def run_import(config: Config, source: str, *, site: str | None = None, layer: int | None = None,
               name: str | None = None) -> str:
    """Bring a released SAE into the run as RUN/imported/<name>, for eval, export's index and the report.

    Site and layer come from the release's folders or hook name unless given; the SAE
    must read a stream the run harvested, with the store's d_in. The name defaults to
    one derived from the stream and the arrays' content, so importing the same SAE twice
    is a no-op and two different SAEs never overwrite each other.
    """
    from gemmascope.eval.catalog import IMPORT_RECORD, imported_root
    from gemmascope.store import ActivationStore

    released = load_released(source)
    site = site or released.site
    layer = released.layer if layer is None else layer
    if site is None or layer is None:
        raise UserError(f"{source}: its site and layer cannot be read from the path; pass --site and --layer")
    store = ActivationStore.open(config.run_dir)
    if (site, layer) not in store.d_in:
        raise UserError(f"{source}: site {site!r} layer {layer} was not harvested into {store.url} "
                        f"(harvested: {', '.join(f'{s} L{n}' for s, n in store.keys)})")
    d_in, width = released.arrays["W_enc"].shape
    stored_d_in = store.d_in[(site, layer)]
    if d_in != stored_d_in:
        raise UserError(f"{source}: d_in {d_in} does not match the store's {site} activations ({stored_d_in})")
    data = params_npz_bytes(released.arrays)
    name = name or f"{site}-L{layer}-w{width_label(width)}-{hashlib.sha256(data).hexdigest()[:8]}"
    if not _NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only, not starting with '.'")
    directory = storage.join(imported_root(config), name)
    record_url = storage.join(directory, IMPORT_RECORD)
    if storage.exists(record_url):
        if storage.read_bytes(storage.join(directory, "params.npz")) == data:
            return f"import: {source} is already in the run as {directory}"
        raise UserError(f"{directory}: another SAE was imported under the name {name!r}; choose another --name")
    storage.write_bytes_atomic(storage.join(directory, "params.npz"), data)
    storage.write_json_atomic(record_url, {"name": name, "site": site, "layer": layer, "width": int(width),
                                           "source": storage.normalize(source), "format": released.format})
    return f"import: {released.format} SAE ({site} L{layer}, width {width}) from {source} -> {directory}; " \
           f"`gemmascope eval {config.origin}` measures it, export indexes it, the report shows it"
