"""`gemmascope eval CONFIG`: measure every SAE of the run (trained or imported) on held-out data.

Held-out means the last train.holdout_rows rows of the store, which training never
reads, and the packed sequences that lie wholly inside them. SAEs are evaluated per
activation stream, so the model loads once and each batch's clean and zero-ablated
passes are shared by every SAE of the stream. Each SAE's metrics.json lands beside its
params.npz; an SAE that has one is skipped, so a rerun only evaluates what is new.

A stream is (site, layer, target): a transcoder (mlp_in -> mlp) is measured on the rows
of both of its sites and spliced in place of the MLP, so it never shares a stream with an
mlp SAE of its layer (they share the clean and the zero-ablated passes all the same).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.eval.activations import activation_metrics
from gemmascope.eval.catalog import RunSAE, run_saes
from gemmascope.eval.lm import lm_metrics, released_reconstruction
from gemmascope.store import ActivationStore
from gemmascope.store.sequences import overlapping_sequences

log = logging.getLogger("gemmascope.eval")


def heldout_batches(config: Config, store: ActivationStore, start: int) -> list[tuple]:
    """Batches of (ids, role) of the sequences that lie wholly in the held-out rows."""
    sequences = [(ids, role) for _, ids, role, _, first in
                 overlapping_sequences(store.url, store.layout, start, store.n_rows) if first >= start]
    sequences = sequences[: config.eval.sequences]
    size = config.eval.batch_size
    return [(np.stack([s[0] for s in sequences[i:i + size]]), np.stack([s[1] for s in sequences[i:i + size]]))
            for i in range(0, len(sequences), size)]


def run_eval(config: Config, *, progress: bool = True) -> str:
    store = ActivationStore.open(config.run_dir)
    holdout = config.train.holdout_rows
    if holdout == 0:
        raise UserError(f"{config.origin}: train.holdout_rows is 0, so no rows were held out to evaluate on")
    start = store.n_rows - holdout
    stop = store.n_rows if config.eval.max_rows is None else min(store.n_rows, start + config.eval.max_rows)
    todo = [sae for sae in run_saes(config, store) if not storage.exists(storage.join(sae.directory, "metrics.json"))]
    if not todo:
        return "eval: every SAE of the run already has metrics.json"
    streams: dict[tuple, list[RunSAE]] = defaultdict(list)
    for sae in todo:
        streams[(sae.site, sae.layer, sae.target)].append(sae)
    batches = heldout_batches(config, store, start)
    if not batches:
        raise UserError(f"{store.url}: no whole sequence lies in the last {holdout} rows; "
                        "raise train.holdout_rows to at least one context length")
    from gemmascope.models.loading import load_model

    loaded = load_model(config.model)
    released = {sae.directory: sae.released() for sae in todo}
    topk = {sae.directory: sae.k for sae in todo if sae.k is not None}
    log.info("eval: %d SAEs on %d held-out sequences (%d batches), one clean pass per batch", len(todo),
             sum(len(ids) for ids, _ in batches), len(batches))
    lm = lm_metrics(loaded, batches, {key: {sae.directory: released_reconstruction(released[sae.directory], sae.k)
                                            for sae in members} for key, members in streams.items()},
                    progress=progress)
    for (site, layer, target), members in streams.items():
        stored = activation_metrics(store, site, layer, start, stop,
                                    {sae.directory: released[sae.directory] for sae in members},
                                    config.eval.dense_threshold, topk, target=target)
        for sae in members:
            record = {"site": site, "layer": layer, "width": sae.width, "sparsity": sae.sparsity,
                      "architecture": sae.architecture, **({"k": sae.k} if sae.k is not None else {}),
                      **({"target": target, "skip": sae.skip} if sae.transcoder else {}),
                      "job": sae.job, "name": sae.name, "tokens_trained": sae.tokens, "source": sae.source,
                      **stored[sae.directory], **lm[(site, layer, target)].metrics(sae.directory)}
            storage.write_json_atomic(storage.join(sae.directory, "metrics.json"), record)
            log.info("%s %s: L0 %.1f, FVU %.3f, delta loss %.4f, loss recovered %.3f", sae.job, sae.name,
                     record["l0"], record["fvu"], record["delta_loss"], record["loss_recovered"])
    first = next(iter(lm.values()))
    return f"eval: {len(todo)} SAEs on {first.tokens:,} held-out tokens ({first.sequences} sequences) and " \
           f"{stop - start:,} held-out activation rows"
