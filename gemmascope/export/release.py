"""`gemmascope export CONFIG`: every evaluated trained SAE into the Gemma Scope tree and SAELens's format.

    RUN/saes/<site>/layer_<L>/width_<W>/average_l0_<K>/params.npz   (+ metrics.json, config.json)
    RUN/saelens/<site>/layer_<L>/width_<W>/average_l0_<K>/sae_weights.safetensors (+ cfg.json)
    RUN/saes/index.json     every SAE, its metrics and paths; "canonical" marks, per
                            (site, layer, width), the SAE whose L0 is closest to 100

Transcoders (SPEC.md 5) have folders of their own in place of <site>: `transcoders/`
and, for skip transcoders (params.npz with W_skip as well), `skip_transcoders/`; in
SAELens's tree they are "jumprelu_transcoder" / "jumprelu_skip_transcoder" (W_skip
transposed, as SAELens stores it). Canonical is per (kind, layer, width), kind being the
site or the transcoder folder. Every index entry says its "target" (the site itself for
an SAE) and "skip".

K is the L0 measured by `gemmascope eval`, so export needs it to have run. Two SAEs of
one (site, layer, width) that round to the same K get their lambda (other architectures:
their knob, e.g. btk32) appended to the folder. Canonical is per architecture too. TopK
SAEs are not JumpReLU-shaped: they go to the SAELens tree only (index "path": null).
Imported SAEs are listed in the index (with their own path under RUN/imported, so the
report shows them beside the run's) but are not re-released or canonical.
Files are rewritten byte for byte the same on a rerun.
"""

from __future__ import annotations

import logging
from collections import Counter

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.eval.catalog import IMPORTED, run_saes
from gemmascope.export.gemma_scope import params_npz_bytes, release_dir
from gemmascope.export.saelens import run_metadata, saelens_files
from gemmascope.store import ActivationStore
from gemmascope.typed_yaml import to_mapping

CANONICAL_L0 = 100
TRANSCODER_FOLDERS = {False: "transcoders", True: "skip_transcoders"}  # by skip
log = logging.getLogger("gemmascope.export")


def release_kind(sae) -> str:
    """The top folder of an SAE's release: its site, or `transcoders` / `skip_transcoders`."""
    return TRANSCODER_FOLDERS[sae.skip] if sae.transcoder else sae.site


def _knob_suffix(sae) -> str:
    """What tells apart two SAEs of one folder: lambda for JumpReLU (as released runs have it),
    else the knob part of the SAE's name (btk32, l0_45, ...)."""
    return f"lambda{sae.sparsity:g}" if sae.architecture == "jumprelu" else sae.name.split("-", 1)[1]


def run_export(config: Config) -> str:
    store = ActivationStore.open(config.run_dir)
    run = storage.normalize(config.run_dir)
    entries, imported = [], []
    for sae in run_saes(config, store):
        metrics_url = storage.join(sae.directory, "metrics.json")
        if not storage.exists(metrics_url):
            raise UserError(f"{sae.directory}: not evaluated yet (no metrics.json); run `gemmascope eval "
                            f"{config.origin}` first")
        metrics = storage.read_json(metrics_url)
        metrics = {**metrics, "target": sae.target, "skip": sae.skip}
        if sae.job == IMPORTED:
            # An imported TopK SAE is kept as SAELens files (no params.npz), as trained ones are.
            where = f"{IMPORTED}/{sae.name}"
            paths = {"path": None, "saelens_path": where} if sae.k is not None else {"path": where, "saelens_path": None}
            imported.append({**metrics, "canonical": False, **paths})
            continue
        entries.append({"sae": sae, "metrics": metrics, "arrays": sae.released()})
    if not entries and not imported:
        raise UserError(f"{run}: no finished SAEs to export; run `gemmascope sweep {config.origin}` first")

    folders = [release_dir(release_kind(e["sae"]), e["sae"].layer, e["sae"].width, e["metrics"]["l0"])
               for e in entries]
    clashes = Counter(folders)
    canonical = {}
    for entry in entries:
        if entry["sae"].k is not None:
            continue  # TopK: not in the Gemma Scope tree, so never its canonical SAE
        key = (release_kind(entry["sae"]), entry["sae"].layer, entry["sae"].width, entry["sae"].architecture)
        best = canonical.get(key)
        if best is None or abs(entry["metrics"]["l0"] - CANONICAL_L0) < abs(best["metrics"]["l0"] - CANONICAL_L0):
            canonical[key] = entry
    index = []
    for entry, folder in zip(entries, folders, strict=True):
        sae = entry["sae"]
        if clashes[folder] > 1:
            folder = f"{folder}_{_knob_suffix(sae)}"
        is_canonical = canonical.get((release_kind(sae), sae.layer, sae.width, sae.architecture)) is entry
        gemma_scope = sae.k is None
        record = {**entry["metrics"], "canonical": is_canonical, "path": f"saes/{folder}" if gemma_scope else None,
                  "saelens_path": f"saelens/{folder}"}
        saelens_dir = storage.join(run, "saelens", folder)
        if gemma_scope:
            gemma_dir = storage.join(run, "saes", folder)
            storage.write_bytes_atomic(storage.join(gemma_dir, "params.npz"), params_npz_bytes(
                entry["arrays"], d_out=sae.d_out if sae.transcoder else None))
            storage.write_json_atomic(storage.join(gemma_dir, "metrics.json"), record)
            storage.write_json_atomic(storage.join(gemma_dir, "config.json"),
                                      {"job": sae.job, "sae": sae.name, "config": to_mapping(config)})
        else:
            log.info("export: %s %s is TopK (k=%d), which no JumpReLU threshold reproduces: SAELens format only, "
                     "in %s", sae.job, sae.name, sae.k, saelens_dir)
        weights, cfg = saelens_files(entry["arrays"], site=sae.site, layer=sae.layer, k=sae.k, target=sae.target,
                                     **run_metadata(config))
        storage.write_bytes_atomic(storage.join(saelens_dir, "sae_weights.safetensors"), weights)
        storage.write_bytes_atomic(storage.join(saelens_dir, "cfg.json"), cfg)
        index.append(record)
    storage.write_json_atomic(storage.join(run, "saes", "index.json"),
                              {"model": config.model.source, "saes": index + imported})
    also = f" (+ {len(imported)} imported, indexed only)" if imported else ""
    topk = sum(record["path"] is None for record in index)
    also += f" ({topk} TopK in SAELens format only)" if topk else ""
    transcoders = sum(entry["sae"].transcoder for entry in entries)
    also += f" ({transcoders} transcoders under saes/transcoders, saes/skip_transcoders)" if transcoders else ""
    return f"export: {len(index)} SAEs to {run}/saes (Gemma Scope params.npz) and {run}/saelens (SAELens){also}; " \
           f"{sum(r['canonical'] for r in index)} canonical; index at {run}/saes/index.json"
