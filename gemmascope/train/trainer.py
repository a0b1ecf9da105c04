"""`gemmascope train CONFIG --job ID`: train one job's group of SAEs, resumably.

The job directory RUN/train/<job>/ holds job.json (what is trained, checked on every
restart), normalisation.json (C and its sample), checkpoints/, metrics.jsonl, and when
finished saes/<name>/params.npz (released scale) with sae.json, then done.json, the
job's commit point. A restarted job continues from its latest checkpoint; on CPU the
result is bit-identical to an uninterrupted run.

With `dist` the job is one JAX program over several hosts (`distributed`): every
process runs this same function on the same inputs; only the writer writes the files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace

import jax
import numpy as np
from tqdm import tqdm

from gemmascope import storage
from gemmascope.config import Config, TrainConfig
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import params_npz_bytes
from gemmascope.export.saelens import CFG, WEIGHTS, run_metadata, saelens_files
from gemmascope.faults import crash_point
from gemmascope.store import ActivationStore
from gemmascope.sweep.grid import Job, find_job, plan_jobs
from gemmascope.train.architectures import JUMPRELU, as_jumprelu
from gemmascope.train.checkpoints import Checkpoints
from gemmascope.train.distributed import (
    Distributed,
    PreemptionWatch,
    barrier,
    host_copy,
    initialize,
    is_writer,
)
from gemmascope.train.group import Group, initial_state, make_train_step, sharded_layout
from gemmascope.train.loader import ActivationLoader, LoaderState
from gemmascope.train.mesh import batch_sharding, make_mesh, place_batch, replicated
from gemmascope.train.normalise import estimate_scale
from gemmascope.train.release import from_release, to_release
from gemmascope.train.sparse import sparse_available
from gemmascope.typed_yaml import to_mapping

log = logging.getLogger("gemmascope.train")


class Preempted(UserError):
    """SIGTERM arrived; the job checkpointed and stopped. Rerun to continue. In a multi-host
    job a SIGTERM on any host stops every process at one agreed step (`PreemptionWatch`)."""

    exit_code = 143  # 128 + SIGTERM, what schedulers expect from a preempted job


@dataclass(frozen=True)
class TrainResult:
    job: str
    directory: str
    steps: int
    steps_run: int
    tokens_per_s: float


def job_dir(config: Config, job_id: str) -> str:
    return storage.join(storage.normalize(config.run_dir), "train", job_id)


def job_train_config(config: Config, job: Job) -> TrainConfig:
    """The training settings of one job: its token budget and its planned latent axis."""
    return replace(config.train, tokens=job.tokens, mesh_latent=job.resources.mesh_latent)


def job_group(job: Job, d_in: int, d_out: int | None = None) -> Group:
    """The group a job trains: its SAEs' widths, knobs and architectures, in job order; a
    transcoder job's with its target width `d_out` and each one's skip."""
    return Group.of(d_in, [(s.width, s.sparsity) for s in job.saes], [s.architecture for s in job.saes],
                    d_out, [s.skip for s in job.saes])


def _sae_record(spec) -> dict:
    """An SAE in job.json: width and knob, and the architecture unless JumpReLU, skip if set
    (so a JumpReLU SAE job's record reads as it did before there were other kinds)."""
    record = {"width": spec.width, "sparsity": spec.sparsity}
    if spec.architecture != JUMPRELU:
        record["architecture"] = spec.architecture
    return {**record, "skip": True} if spec.skip else record


def _check_job_record(directory: str, record: dict) -> None:
    """A job directory belongs to one job definition; refuse to resume under another.
    Every process checks; the writer records a new job. A train setting added to the
    config after the job started is read as its default, which is what the job ran with."""
    url = storage.join(directory, "job.json")
    if storage.exists(url):
        existing = storage.read_json(url)
        existing["train"] = {**to_mapping(TrainConfig()), **existing.get("train", {})}
        for key in ("d_in", "d_out", "saes", "train", "store"):
            if existing.get(key) != record.get(key):
                raise UserError(f"{url}: job was started with {key}={existing.get(key)!r}, "
                                f"now {key}={record[key]!r}; use a new run_dir")
        return
    if is_writer():
        storage.write_json_atomic(url, record)


def logged_metrics(config: Config, job_id: str) -> list[dict]:
    """Every record of a job's metrics.jsonl, in order ([] before its first log)."""
    try:
        text = storage.read_bytes(storage.join(job_dir(config, job_id), "metrics.jsonl")).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line]


class _MetricsLog:
    """metrics.jsonl, rewritten whole at each log (GCS objects cannot be appended to)."""

    def __init__(self, url: str, resume_step: int):
        self.url = url
        self.lines: list[str] = []
        if storage.exists(url):
            kept = [line for line in storage.read_bytes(url).decode().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.lines = kept

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record, sort_keys=True))
        storage.write_bytes_atomic(self.url, ("\n".join(self.lines) + "\n").encode())


def _records(group: Group, metrics: dict, step: int, tokens_per_s: float, batch: int,
             loader: ActivationLoader) -> list[dict]:
    """One metrics.jsonl record per SAE, with the loader's read rate (MiB/s of store reads:
    what the store delivers; on GCS, what the storage section's request concurrency buys).
    Like tokens_per_s it is a timing of this process; every other field is the same after
    a resume as in an uninterrupted run."""
    return [{
        "step": step, "sae": group.name(i), "width": width, "sparsity": sparsity,
        "architecture": group.architecture(i),
        **_knob_record(group.architecture(i), sparsity, float(metrics["sparsity_factor"])),
        **{name: np.asarray(value).tolist() for name, value in metrics["terms"][i].items()},
        "l0": float(metrics["l0"][i]), "mse": float(metrics["mse"][i]), "fvu": float(metrics["fvu"][i]),
        "loss": float(metrics["loss"][i]), "dead_fraction": float(metrics["dead_fraction"][i]),
        "lr": float(metrics["lr"]),
        "tokens": step * batch, "tokens_per_s": tokens_per_s, "nonfinite_rows_skipped": loader.state.skipped_rows,
        "loader_read_mib_s": loader.throughput()["read_mib_s"],
        "sparse_step": bool(metrics["sparse_step"][i]),
    } for i, (width, sparsity) in enumerate(group.saes)]


def _knob_record(architecture: str, knob: float, factor: float) -> dict:
    """The knob as the log names it: the warmed-up penalty coefficient ("lambda", JumpReLU and
    ReLU + L1), the target L0, or k."""
    if architecture in ("jumprelu", "relu_l1"):
        return {"lambda": knob * factor}
    return {"l0_target": knob} if architecture == "jumprelu_target_l0" else {"k": int(knob)}


def train_job(config: Config, job_id: str, *, progress: bool = True,
              dist: Distributed | None = None) -> TrainResult:
    """Train (or resume, or re-export) job `job_id`; with `dist`, as one process of a
    multi-host job, joined before anything starts JAX's backend."""
    initialize(dist)
    writer = is_writer()
    store = ActivationStore.open(config.run_dir, io=config.storage)
    job = find_job(plan_jobs(config, store.model_info()), job_id, config.origin)
    cfg = job_train_config(config, job)
    key = (job.site, job.layer)
    transcoder = job.target != job.site
    for site in (job.site, job.target):
        if (site, job.layer) not in store.d_in:
            raise UserError(f"{store.url}: no activations for site {site!r} layer {job.layer} "
                            f"(harvested: {', '.join(f'{site}/{layer}' for site, layer in store.keys)})")
    if not store.complete:
        raise UserError(f"{store.url}: the harvest is not complete; finish it first")
    d_in = store.d_in[key]
    d_out = store.d_in[(job.target, job.layer)] if transcoder else None
    directory = job_dir(config, job.id)
    record = {"job": job.id, "site": job.site, "layer": job.layer, "d_in": d_in, "store": store.url,
              "saes": [_sae_record(s) for s in job.saes], "train": to_mapping(cfg)}
    _check_job_record(directory, {**record, "target": job.target, "d_out": d_out} if transcoder else record)
    stop_row = store.n_rows - cfg.holdout_rows
    if stop_row <= 0:
        raise UserError(f"train.holdout_rows={cfg.holdout_rows} leaves no training rows ({store.n_rows} in the store)")

    norm_url = storage.join(directory, "normalisation.json")
    if storage.exists(norm_url):
        normalisation = storage.read_json(norm_url)
    else:  # deterministic, so every process computes the same C (a transcoder's from its input); one writes it
        normalisation = estimate_scale(store, *key, sample_rows=cfg.norm_sample_rows, stop_row=stop_row,
                                       seed=cfg.seed, target=job.target if transcoder else None)
        if writer:
            storage.write_json_atomic(norm_url, normalisation)
    scale = normalisation["scale"]
    log.info("%s: C=%.4g from %d rows (max norm %.3g x median)", job.id, scale, normalisation["sample_rows"],
             normalisation["max_norm"] / normalisation["median_norm"])
    target_mean_square = 1.0
    if transcoder:
        if "target_mean_square" not in normalisation:
            raise UserError(f"{norm_url}: no target_mean_square for the transcoder's {job.target} rows; "
                            "delete the file to estimate it again")
        target_mean_square = normalisation["target_mean_square"]
        log.info("%s: E||%s / C||^2 = %.4g (an SAE's is 1): the sparsity penalties are multiplied by it",
                 job.id, job.target, target_mean_square)

    mesh = make_mesh(cfg)
    group = job_group(job, d_in, d_out)
    abstract, shardings = sharded_layout(group, cfg, mesh)
    checkpoints = Checkpoints(storage.join(directory, "checkpoints"))
    if checkpoints.latest_step is not None:
        state, meta = checkpoints.restore(abstract)
        loader_state = LoaderState(**meta["loader"])
        log.info("%s: resuming from step %d", job.id, int(state.step))
    else:
        state = _start_from_released(initial_state(group, cfg, shardings), job, scale, shardings)
        loader_state = LoaderState()
    start = int(state.step)

    placement = batch_sharding(mesh)
    step = make_train_step(group, cfg, scale, use_sparse=sparse_available(mesh, cfg),
                           target_mean_square=target_mean_square)
    step_fn = jax.jit(step, in_shardings=(shardings, placement), out_shardings=(shardings, replicated(mesh)),
                      donate_argnums=0)
    loader = ActivationLoader(store, *key, batch_size=cfg.batch_size, shuffle_rows=cfg.shuffle_rows,
                              seed=cfg.seed, stop_row=stop_row, nonfinite=cfg.nonfinite,
                              prefetch=cfg.prefetch_batches, start=loader_state,
                              place=lambda rows: place_batch(rows, placement), target=job.target if transcoder else None)
    metrics_log = _MetricsLog(storage.join(directory, "metrics.jsonl"), start) if writer else None

    def save() -> None:
        checkpoints.save(int(state.step), state, {"loader": asdict(loader.state), "seed": cfg.seed,
                                                  "scale": scale})

    total = cfg.steps
    began, window_start, window_step = time.perf_counter(), time.perf_counter(), start
    try:
        with PreemptionWatch() as preemption, \
                tqdm(total=total, initial=start, desc=job.id, unit="step", disable=not progress) as bar:
            for step in range(start, total):
                state, metrics = step_fn(state, loader.next())
                crash_point("train.step")
                done = step + 1
                if done % cfg.log_every == 0 or done == total:
                    metrics = jax.device_get(metrics)
                    now = time.perf_counter()
                    rate = (done - window_step) * cfg.batch_size / (now - window_start)
                    window_start, window_step = now, done
                    records = _records(group, metrics, done, rate, cfg.batch_size, loader)
                    if metrics_log:
                        for record in records:
                            metrics_log.write(record)
                    bar.set_postfix(l0=f"{records[0]['l0']:.1f}", fvu=f"{records[0]['fvu']:.3f}",
                                    tok_s=f"{rate:,.0f}")
                bar.update(1)
                if done == total:
                    break  # finished: saved and exported below, even if SIGTERM came with the last step
                preempted = preemption.requested(done)
                if done % cfg.checkpoint_every == 0 or preempted:  # one save per step, whichever asked
                    save()
                if preempted:
                    raise Preempted(f"{job.id}: SIGTERM; checkpointed at step {done}; rerun to continue")
        if start < total:
            save()
    finally:
        loader.close()
        # Also after a failed save: Orbax's writer threads must stop before the interpreter
        # does, or they print tracebacks after the command's one error line.
        checkpoints.close()
    _export(config, directory, job, group, state, scale, normalisation)
    seconds = time.perf_counter() - began
    return TrainResult(job.id, directory, total, total - start,
                       (total - start) * cfg.batch_size / seconds if total > start else 0.0)


def _start_from_released(state, job: Job, scale: float, shardings):
    """Replace the fresh parameters of SAEs with `init_from` by the released SAE, at training scale."""
    if not any(spec.init_from for spec in job.saes):
        return state
    from gemmascope.export.importers import load_released

    params = list(state.params)
    for index, spec in enumerate(job.saes):
        if spec.init_from:
            arrays = load_released(spec.init_from).arrays
            if arrays["W_enc"].shape != (job.d_in, spec.width):
                raise UserError(f"{spec.init_from}: an SAE of shape {arrays['W_enc'].shape} cannot start "
                                f"{job.id} {spec.name} (d_in {job.d_in}, width {spec.width})")
            params[index] = from_release(arrays, scale)
            log.info("%s %s: starting from %s", job.id, spec.name, spec.init_from)
    return jax.device_put(state._replace(params=tuple(params)), shardings)


def _export(config: Config, directory: str, job: Job, group: Group, state, scale: float,
            normalisation: dict) -> None:
    """Write each SAE at release scale, then done.json (the job's commit point). Every
    process gathers the parameters (a collective); the writer writes, and no process
    returns before done.json is there."""
    params, estimates = host_copy((state.params, state.estimates))
    if is_writer():
        estimate_of = dict(zip(group.estimated, estimates, strict=True))
        for index in range(group.size):
            _write_sae(config, directory, job, group, index, params[index], estimate_of.get(index),
                       int(state.step), scale)
        storage.write_json_atomic(storage.join(directory, "done.json"), {
            "saes": [group.name(i) for i in range(group.size)], "steps": int(state.step),
            "normalisation": normalisation})
    barrier(f"{job.id} exported")


def _write_sae(config: Config, directory: str, job: Job, group: Group, index: int, params, estimate,
               steps: int, scale: float) -> None:
    """One SAE at release scale: a JumpReLU-shaped one (`as_jumprelu`) as the Gemma Scope
    params.npz, TopK (no threshold reproduces it) as SAELens files with its k; sae.json
    says which, with the architecture and its knob."""
    width, knob = group.saes[index]
    architecture = group.architecture(index)
    sae_dir = storage.join(directory, "saes", group.name(index))
    if estimate is not None and not float(estimate.weight) > 0:
        raise UserError(f"{job.id} {group.name(index)}: no batch kept a positive activation in {steps} steps, "
                        "so no global threshold was learned; train longer or with a larger k")
    jumprelu = as_jumprelu(architecture, params, estimate)
    if jumprelu is not None:
        released = to_release(jumprelu, scale, transcoder=group.transcoder)
        storage.write_bytes_atomic(storage.join(sae_dir, "params.npz"), params_npz_bytes(released, d_out=group.d_out))
    else:
        weights, cfg = saelens_files(to_release(params, scale), site=job.site, layer=job.layer, k=int(knob),
                                     **run_metadata(config))
        storage.write_bytes_atomic(storage.join(sae_dir, WEIGHTS), weights)
        storage.write_bytes_atomic(storage.join(sae_dir, CFG), cfg)
    record = {"site": job.site, "layer": job.layer, "width": width, "sparsity": knob, "d_in": group.d_in,
              "scale": scale, "steps": steps}
    if architecture != JUMPRELU:
        record.update(architecture=architecture, format="gemma-scope" if jumprelu is not None else "saelens",
                      **_knob_record(architecture, knob, 1.0))
    if group.transcoder:  # a transcoder: what it predicts, its width, and whether it has a skip
        record.update(target=job.target, d_out=group.d_out, skip=group.skip(index))
    if estimate is not None:
        record["threshold"] = float(estimate.value) * scale  # released scale, as params.npz holds it
    storage.write_json_atomic(storage.join(sae_dir, "sae.json"), record)
