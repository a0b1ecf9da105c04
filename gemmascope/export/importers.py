"""Load a released SAE from either published format, to evaluate it, show it, or start from it.

A Gemma Scope folder holds params.npz (its site, layer and width come from the folder
names when they follow the release layout; `transcoders/` and `skip_transcoders/` hold
transcoders from mlp_in to mlp, as `gemmascope export` writes them); a SAELens folder
holds sae_weights.safetensors and cfg.json (site and layer from its hook name).

What can be imported (`gemmascope import`), and how the run keeps it in RUN/imported/<name>:

- JumpReLU SAEs (Gemma Scope params.npz, SAELens "jumprelu"): params.npz as released;
- ReLU SAEs (SAELens "standard"): params.npz with threshold 0, which is exactly ReLU
  (architecture "relu");
- TopK SAEs (SAELens "topk", with k): no threshold reproduces them, so SAELens topk files,
  as the trainer keeps its own TopK SAEs, measured with their k;
- JumpReLU transcoders, with or without skip (Gemma Scope transcoders/, skip_transcoders/;
  SAELens "jumprelu_transcoder", "jumprelu_skip_transcoder"): params.npz with W_dec in the
  target's width (and W_skip [d_in, d_out]), spliced in place of the MLP by eval.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from gemmascope import storage
from gemmascope.config import TRANSCODER_PAIRS, Config
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import TRANSCODER_WIDTH, params_npz_bytes, read_params_npz
from gemmascope.export.saelens import (
    CFG,
    READABLE,
    TOPK_KEYS,
    WEIGHTS,
    load_topk,
    read_saelens_any,
    run_metadata,
    saelens_files,
)
from gemmascope.models.sites import SITES
from gemmascope.sweep.grid import width_label
from gemmascope.train.release import SKIP_KEY

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # not ".", "..": the name is a folder under RUN/imported
_RELEASE_PATH = re.compile(r"(?:^|/)([a-z_]+)/layer_(\d+)/width_[0-9]+[km]?/average_l0_\d+[^/]*/?$")
_RELEASE_LAYER = re.compile(r"(?:^|/)layer_(\d+)/width_[0-9]+[km]?/average_l0_\d+[^/]*/?$")
# The release's transcoder folders (as `gemmascope export` writes them), by skip, and what
# their transcoders read and predict (SPEC.md 5).
TRANSCODER_FOLDERS = {"transcoders": False, "skip_transcoders": True}
RELEASE_TRANSCODER = ("mlp_in", "mlp")
SUPPORTED = ("Gemma Scope params.npz (SAEs; transcoders/, skip_transcoders/), SAELens "
             + ", ".join(READABLE))


@dataclass(frozen=True)
class ImportedSAE:
    arrays: dict[str, np.ndarray]  # release arrays (raw activations in, raw output out); TopK: four
    site: str | None
    layer: int | None
    format: str  # "gemma-scope" or "saelens"
    architecture: str = "jumprelu"  # "jumprelu", "relu" (threshold 0) or "topk" (with k)
    k: int | None = None
    target: str | None = None  # a transcoder's output site; None: an SAE, or unknown from its path
    file: str = ""  # the file its arrays came from, for error messages

    @property
    def skip(self) -> bool:
        return SKIP_KEY in self.arrays


def _gemma_scope(location: str, target: str | None) -> ImportedSAE:
    url = storage.join(location, "params.npz")
    data = storage.read_bytes(url)
    site = layer = None
    match = _RELEASE_PATH.search(location)
    folder_skip = None
    if match and match.group(1) in TRANSCODER_FOLDERS:
        (site, target), folder_skip = RELEASE_TRANSCODER, TRANSCODER_FOLDERS[match.group(1)]
    elif match and match.group(1) in SITES:
        site = match.group(1)
    layer_match = _RELEASE_LAYER.search(location)
    if layer_match:
        layer = int(layer_match.group(1))
    arrays = read_params_npz(data, url, d_out=TRANSCODER_WIDTH if target is not None else None)
    if SKIP_KEY in arrays and target is None:  # only a skip transcoder has W_skip
        site, target = site or RELEASE_TRANSCODER[0], RELEASE_TRANSCODER[1]
    if folder_skip is not None and folder_skip != (SKIP_KEY in arrays):
        raise UserError(f"{url}: a {match.group(1)} folder, but params.npz "
                        f"{'lacks' if folder_skip else 'has'} {SKIP_KEY}")
    return ImportedSAE(arrays, site, layer, "gemma-scope", target=target, file=url)


def load_released(location: str, *, target: str | None = None, every_kind: bool = False) -> ImportedSAE:
    """The SAE in `location` (a folder, local or gs://, or a params.npz file).

    By default only a JumpReLU SAE (what can start training); with `every_kind`, also the
    ReLU and TopK SAEs and the transcoders that `gemmascope import` takes. `target`: the site
    a Gemma Scope transcoder predicts, when its folders do not say."""
    location = storage.normalize(location)
    if location.endswith(".npz"):
        location = location.rsplit("/", 1)[0]
    weights, cfg = storage.join(location, WEIGHTS), storage.join(location, CFG)
    if storage.exists(storage.join(location, "params.npz")):
        released = _gemma_scope(location, target)
    elif storage.exists(weights) and storage.exists(cfg):
        found = read_saelens_any(storage.read_bytes(weights), storage.read_bytes(cfg), location)
        released = ImportedSAE(found.arrays, found.site, found.layer, "saelens", found.architecture, found.k,
                               found.target, weights)
    else:
        raise UserError(f"{location}: no SAE here (expected params.npz, or {WEIGHTS} with {CFG})")
    if not every_kind and (released.architecture != "jumprelu" or released.target is not None):
        kind = f"transcoder ({released.site} -> {released.target})" if released.target \
            else f"{released.architecture} SAE"
        raise UserError(f"{location}: a {kind}; only a JumpReLU SAE can be used here")
    return released


def _describe(released: ImportedSAE, site: str, target: str) -> str:
    if target != site:
        return f"{'skip ' if released.skip else ''}transcoder ({site} -> {target})"
    return {"jumprelu": "JumpReLU SAE", "relu": "ReLU SAE (kept as JumpReLU with threshold 0)",
            "topk": f"TopK SAE (k={released.k}, kept as SAELens files)"}[released.architecture]


def _check_stream(released: ImportedSAE, store, site: str, target: str, layer: int) -> None:
    """The SAE's input (and a transcoder's target) were harvested, with its widths."""
    where = released.file
    harvested = ", ".join(f"{s} L{n}" for s, n in store.keys)
    if target != site:
        if (site, target) not in TRANSCODER_PAIRS:
            raise UserError(f"{where}: no transcoder from {site} to {target} (supported: "
                            f"{', '.join(f'{a} -> {b}' for a, b in sorted(TRANSCODER_PAIRS))})")
        if released.target is None and released.format != "gemma-scope":  # SAELens says what it is
            raise UserError(f"{where}: a SAELens {released.architecture} SAE, not a transcoder ({site} -> "
                            f"{target}); --target is for Gemma Scope transcoders' params.npz")
    elif released.skip:
        raise UserError(f"{where}: has {SKIP_KEY}, so it is a skip transcoder, but reads and predicts {site}; "
                        f"pass the site it reads and --target for the one it predicts")
    elif released.target not in (None, site):
        raise UserError(f"{where}: a transcoder ({released.site} -> {released.target}) cannot be imported as "
                        f"an SAE of {site}")
    for role, stream, array, axis in (("site", site, "W_enc", 0), ("target site", target, "W_dec", 1)):
        if role == "target site" and target == site:
            continue
        if (stream, layer) not in store.d_in:
            raise UserError(f"{where}: {role} {stream!r} layer {layer} was not harvested into {store.url} "
                            f"(harvested: {harvested})")
        width, stored = int(released.arrays[array].shape[axis]), store.d_in[(stream, layer)]
        if width != stored:
            name = "d_in" if axis == 0 else "d_out"
            raise UserError(f"{where}: {name} {width} ({array}) does not match the store's {stream} L{layer} "
                            f"activations ({stored})")


def _same_sae(directory: str, record: dict, released: ImportedSAE, data: bytes | None, stream: tuple) -> bool:
    if (record.get("site"), record.get("layer"), record.get("target") or record.get("site")) != stream:
        return False
    if released.k is None:
        npz = storage.join(directory, "params.npz")
        return record.get("k") is None and storage.exists(npz) and storage.read_bytes(npz) == data
    if record.get("k") != released.k:
        return False
    arrays, k = load_topk(directory)
    return k == released.k and all(np.array_equal(arrays[key], released.arrays[key]) for key in TOPK_KEYS)


def run_import(config: Config, source: str, *, site: str | None = None, layer: int | None = None,
               name: str | None = None, target: str | None = None) -> str:
    """Bring a released SAE into the run as RUN/imported/<name>, for eval, export's index and the report.

    Site and layer (and a transcoder's target) come from the release's folders or hook
    names unless given; the SAE must read a stream the run harvested, with the store's
    d_in (a transcoder's target too, with its d_out). The name defaults to one derived
    from the stream and the SAE's content, so importing the same SAE twice is a no-op and
    two different SAEs never overwrite each other.
    """
    from gemmascope.eval.catalog import IMPORT_RECORD, imported_root
    from gemmascope.store import ActivationStore

    released = load_released(source, target=target, every_kind=True)
    site = site or released.site
    layer = released.layer if layer is None else layer
    if site is None or layer is None:
        raise UserError(f"{source}: its site and layer cannot be read from the path; pass --site and --layer")
    target = target or released.target or site
    store = ActivationStore.open(config.run_dir)
    if (site, layer) not in store.d_in:
        raise UserError(f"{source}: site {site!r} layer {layer} was not harvested into {store.url} "
                        f"(harvested: {', '.join(f'{s} L{n}' for s, n in store.keys)})")
    _check_stream(released, store, site, target, layer)
    transcoder = target != site
    width = int(released.arrays["W_enc"].shape[1])
    d_out = int(released.arrays["W_dec"].shape[1]) if transcoder else None
    if released.k is None:
        data = params_npz_bytes(released.arrays, d_out=d_out)
        files = {"params.npz": data}
        digest = hashlib.sha256(data).hexdigest()[:8]
    else:
        data = None
        files = dict(zip((WEIGHTS, CFG), saelens_files(released.arrays, site=site, layer=layer, k=released.k,
                                                       **run_metadata(config)), strict=True))
        digest = hashlib.sha256(files[WEIGHTS] + f"k={released.k}".encode()).hexdigest()[:8]
    stream_name = site if not transcoder else f"{site}-to-{target}"
    knob = f"-k{released.k}" if released.k is not None else "-skip" if released.skip else ""
    name = name or f"{stream_name}-L{layer}-w{width_label(width)}{knob}-{digest}"
    if not _NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only, not starting with '.'")
    directory = storage.join(imported_root(config), name)
    record_url = storage.join(directory, IMPORT_RECORD)
    if storage.exists(record_url):
        if _same_sae(directory, storage.read_json(record_url), released, data, (site, layer, target)):
            return f"import: {source} is already in the run as {directory}"
        raise UserError(f"{directory}: another SAE was imported under the name {name!r}; choose another --name")
    for file_name, content in files.items():
        storage.write_bytes_atomic(storage.join(directory, file_name), content)
    record = {"name": name, "site": site, "layer": layer, "width": width, "source": storage.normalize(source),
              "format": released.format, "architecture": released.architecture,
              **({"k": released.k} if released.k is not None else {}),
              **({"target": target, "skip": released.skip, "d_out": d_out} if transcoder else {})}
    storage.write_json_atomic(record_url, record)  # the commit point: written last
    what = _describe(released, site, target)
    return f"import: {released.format} {what} (L{layer}, width {width}) from {source} -> {directory}; " \
           f"`gemmascope eval {config.origin}` measures it, export indexes it, the report shows it"
