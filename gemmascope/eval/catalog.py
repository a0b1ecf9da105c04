"""The SAEs of a run that eval, export and report work on: the sweep's finished ones and imported ones.

A trained SAE lives in RUN/train/<job>/saes/<name>/ (a TopK SAE, which no JumpReLU
reproduces, as SAELens files instead of params.npz); an SAE brought in with
`gemmascope import` (a released Gemma Scope or SAELens SAE or transcoder) lives in
RUN/imported/<name>/ with an `imported.json` saying where it came from and what it is
(architecture, k, target, skip, d_out). Both hold a params.npz at release scale, or a
TopK SAE's SAELens files, so every later stage treats them alike.

A transcoder (SPEC.md 5) reads `site` and predicts `target` (mlp_in -> mlp); its
params.npz has W_dec/b_dec in the target's width and, for a skip transcoder, W_skip.
For an SAE, target == site and skip is False.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemmascope import storage
from gemmascope.config import Config
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import load_params_npz
from gemmascope.export.saelens import load_topk
from gemmascope.store import ActivationStore
from gemmascope.sweep.grid import plan_jobs
from gemmascope.train.release import SKIP_KEY
from gemmascope.train.trainer import job_dir

IMPORTED = "imported"  # the job column of an imported SAE
IMPORT_RECORD = "imported.json"


@dataclass(frozen=True)
class RunSAE:
    site: str
    layer: int
    width: int
    sparsity: float | None  # None: imported, its lambda unknown
    tokens: int | None  # training tokens, None when imported
    job: str  # the job id, or "imported"
    name: str  # unique within its job
    directory: str  # holds params.npz (TopK: SAELens files) and, once evaluated, metrics.json
    source: str | None = None  # where an imported SAE came from
    architecture: str = "jumprelu"  # what it was trained as (an imported one: jumprelu, relu or topk)
    k: int | None = None  # a TopK SAE's k: not JumpReLU-shaped, so it has no params.npz
    target: str | None = None  # the site it reconstructs or predicts; None (the default) means `site`
    skip: bool = False  # a skip transcoder: its output also gets x @ W_skip
    d_out: int | None = None  # a transcoder's output width (the target's d_in in the store)

    def __post_init__(self):
        if self.target is None:
            object.__setattr__(self, "target", self.site)

    @property
    def transcoder(self) -> bool:
        return self.target != self.site

    def released(self) -> dict[str, np.ndarray]:
        """Its arrays at release scale: the five of params.npz (six for a skip transcoder), or a
        TopK SAE's four (use with `k`)."""
        if self.k is None:
            arrays = load_params_npz(storage.join(self.directory, "params.npz"),
                                     d_out=self.d_out if self.transcoder else None)
            if self.skip != (SKIP_KEY in arrays):
                raise UserError(f"{self.directory}: params.npz {'lacks' if self.skip else 'has'} {SKIP_KEY}, "
                                f"but the SAE is {'a skip' if self.skip else 'not a skip'} transcoder")
            return arrays
        return load_topk(self.directory)[0]


def imported_root(config: Config) -> str:
    return storage.join(storage.normalize(config.run_dir), IMPORTED)


def imported_saes(config: Config) -> list[RunSAE]:
    found = []
    for record_url in sorted(storage.glob(storage.join(imported_root(config), "*", IMPORT_RECORD))):
        record = storage.read_json(record_url)
        # Records written before imports had other kinds say only site, layer, width: a JumpReLU SAE.
        found.append(RunSAE(record["site"], record["layer"], record["width"], None, None, IMPORTED, record["name"],
                            record_url.rsplit("/", 1)[0], record["source"],
                            architecture=record.get("architecture", "jumprelu"), k=record.get("k"),
                            target=record.get("target"), skip=bool(record.get("skip", False)),
                            d_out=record.get("d_out")))
    return found


def run_saes(config: Config, store: ActivationStore) -> list[RunSAE]:
    """Every SAE of a finished job, then every imported SAE."""
    found = []
    info = store.model_info()
    for job in plan_jobs(config, info):
        directory = job_dir(config, job.id)
        if storage.exists(storage.join(directory, "done.json")):
            found.extend(RunSAE(spec.site, spec.layer, spec.width, spec.sparsity, spec.tokens, job.id, spec.name,
                                storage.join(directory, "saes", spec.name), architecture=spec.architecture,
                                k=int(spec.sparsity) if spec.architecture == "topk" else None,
                                target=spec.target, skip=spec.skip,
                                d_out=store.d_in.get((spec.target, spec.layer), info.site_width(spec.target)))
                         for spec in job.saes)
    return found + imported_saes(config)
