"""`gemmascope plan CONFIG`: the SAE grid, its jobs and resources, storage and compute, before any work.

Storage is rows x d_in x bytes per value, summed over the arrays the harvest writes
(rows: harvest.max_tokens, or the largest token budget plus the held-out rows when the
harvest is unbounded). Compute is 10 x tokens x d_in x width FLOPs per SAE (the dense
training step; the harvest's forward passes are not counted), and device-hours divide it
by sweep.device_flops x sweep.utilisation.

The harvest write rate per node is an estimate of what the store must absorb: one
worker forwards tokens at sweep.device_flops x sweep.utilisation / (forward FLOPs per
token), every token becomes one row of every harvested array, and
harvest.workers_per_node workers share a node's network. Forward FLOPs per token are
2 x the weights of the layers up to the last harvested one, each layer taken as
attention (q and o: d_model x n_heads x head_dim each, k and v: d_model x n_kv_heads x
head_dim each) and a gated MLP of width d_ff (3 x d_model x d_ff); attention scores,
norms and the embedding lookup are left out. A store recorded before d_ff and n_kv_heads
were lets them default to 4 x d_model and n_heads (an upper bound). `plan` warns when the rate exceeds
storage.node_write_bandwidth_mib_s.
"""

from __future__ import annotations

from gemmascope import storage
from gemmascope.config import Config, harvest_keys
from gemmascope.errors import UserError
from gemmascope.models.loading import ModelInfo, model_info
from gemmascope.sweep.grid import Job, plan_jobs, width_label
from gemmascope.typed_yaml import to_mapping

BYTES_PER_VALUE = {"bfloat16": 2, "float32": 4}


def model_shape(config: Config) -> ModelInfo:
    """The model's shape: from the harvested store when there is one, else from the model config."""
    from gemmascope.store import ActivationStore

    try:
        return ActivationStore.open(config.run_dir).model_info()
    except UserError:
        return model_info(config.model)


def plan(config: Config, info: ModelInfo) -> dict:
    """The plan as one JSON-able object (the DESIGN.md contract of `plan --json`)."""
    return describe(config, info, plan_jobs(config, info))


def describe(config: Config, info: ModelInfo, jobs: list[Job]) -> dict:
    saes = [spec for job in jobs for spec in job.saes]
    arrays = [{"site": site, "layer": layer, "d_in": info.site_width(site)}
              for site, layer in harvest_keys(config.harvest, info.n_layers)]
    harvest = config.harvest
    rows = harvest.max_tokens or max(s.tokens for s in saes) + config.train.holdout_rows
    bytes_per_row = sum(a["d_in"] for a in arrays) * BYTES_PER_VALUE[harvest.store_dtype]
    flops = sum(job.flops() for job in jobs)
    rate = config.sweep.device_flops * config.sweep.utilisation
    write = harvest_write_rate(config, info, bytes_per_row, max((layer for _, layer in
                                                                  harvest_keys(harvest, info.n_layers)), default=0))
    return {
        "config": config.origin,
        "model": {"name": info.name, "n_layers": info.n_layers, "d_model": info.d_model},
        "sae_count": len(saes),
        "saes": [{"site": s.site, "layer": s.layer, "width": s.width, "sparsity": s.sparsity, "tokens": s.tokens,
                  **({"target": s.target} if s.target != s.site else {})} for s in saes],
        "job_count": len(jobs),
        "jobs": [_job_entry(job, config) for job in jobs],
        "storage_rows": rows,
        "storage_arrays": len(arrays),
        "storage_dtype": harvest.store_dtype,
        "storage_bytes": rows * bytes_per_row,
        "training_flops": flops,
        "flop_rate": {"device_flops": config.sweep.device_flops, "utilisation": config.sweep.utilisation},
        "device_hours": flops / rate / 3600,
        "harvest_forward_flops_per_token": write["flops_per_token"],
        "harvest_tokens_per_s_per_worker": write["tokens_per_s"],
        "harvest_workers_per_node": harvest.workers_per_node,
        "harvest_write_mib_s_per_node": write["mib_s"],
        "node_write_bandwidth_mib_s": config.storage.node_write_bandwidth_mib_s,
        "warnings": bandwidth_warnings(config, write["mib_s"]),
    }


def forward_flops_per_token(info: ModelInfo, last_layer: int) -> float:
    """Forward FLOPs per token through decoder layers 0..last_layer (see the module doc)."""
    d = info.d_model
    d_ff = info.d_ff or 4 * d
    kv_heads = info.n_kv_heads or info.n_heads
    attention = 2 * d * info.head_dim * (info.n_heads + kv_heads)
    return 2.0 * (last_layer + 1) * (attention + 3 * d * d_ff)


def harvest_write_rate(config: Config, info: ModelInfo, bytes_per_row: int, last_layer: int) -> dict:
    """One harvest worker's forward tokens/s and the write rate of a node's workers (MiB/s)."""
    per_token = forward_flops_per_token(info, last_layer)
    tokens_per_s = config.sweep.device_flops * config.sweep.utilisation / per_token
    mib_s = tokens_per_s * bytes_per_row * config.harvest.workers_per_node / 2**20
    return {"flops_per_token": per_token, "tokens_per_s": tokens_per_s, "mib_s": mib_s}


def bandwidth_warnings(config: Config, mib_s: float) -> list[str]:
    budget = config.storage.node_write_bandwidth_mib_s
    if budget is None or mib_s <= budget:
        return []
    h = config.harvest
    return [f"harvest writes an estimated {mib_s:,.0f} MiB/s per node ({h.workers_per_node} worker(s) per node), "
            f"more than storage.node_write_bandwidth_mib_s={budget:g}: the workers will wait on the network; "
            f"harvest fewer arrays at once (harvest.sites / harvest.layers), or run fewer workers per node on more "
            f"nodes (lower harvest.workers_per_node)"
            + (", or store bfloat16 (harvest.store_dtype)" if h.store_dtype != "bfloat16" else "")]


def _job_entry(job: Job, config: Config) -> dict:
    epochs_note = {}
    rows = config.harvest.max_tokens
    if rows:
        epochs_note = {"epochs": job.tokens / max(rows - config.train.holdout_rows, 1)}
    return {"id": job.id, "site": job.site, "layer": job.layer, "target": job.target, "d_in": job.d_in,
            "tokens": job.tokens, "steps": job.steps(config.train.batch_size),
            "saes": [s.name for s in job.saes], "architectures": sorted({s.architecture for s in job.saes}),
            "flops": job.flops(), **epochs_note,
            "resources": to_mapping(job.resources)}


def write_plan(config: Config, info: ModelInfo) -> list[Job]:
    """Plan the jobs and publish the plan at RUN/sweep/plan.json (status reads it)."""
    jobs = plan_jobs(config, info)
    storage.write_json_atomic(storage.join(storage.normalize(config.run_dir), "sweep", "plan.json"),
                              describe(config, info, jobs))
    return jobs


def _bytes(n: float) -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti", "Pi"):
        if n < 1024 or prefix == "Pi":
            return f"{n:,.1f} {prefix}B"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _tokens(n: int) -> str:
    return f"{n / 1e9:g}B" if n >= 10**9 else f"{n / 1e6:g}M" if n >= 10**6 else f"{n:,}"


def _devices(resources: dict) -> str:
    """e.g. "8", or "2x8" for a job spanning two hosts of 8 devices."""
    hosts = resources.get("hosts", 1)
    return f"{hosts}x{resources['devices']}" if hosts > 1 else str(resources["devices"])


def format_plan(result: dict) -> str:
    """A readable table: one line per job, then the totals."""
    lines = [f"{result['config']}: {result['sae_count']} SAEs in {result['job_count']} jobs on "
             f"{result['model']['name']} ({result['model']['n_layers']} layers)", ""]
    header = f"{'job':<28} {'SAEs':>4} {'widths':<14} {'tokens':>8} {'steps':>9} {'devices':>7} " \
             f"{'mesh d x l':>10} {'GiB/dev':>8} {'PFLOP':>10}"
    lines += [header, "-" * len(header)]
    for job in result["jobs"]:
        res = job["resources"]
        widths = sorted({int(name.split("-")[0][1:]) for name in job["saes"]})
        lines.append(
            f"{job['id']:<28} {len(job['saes']):>4} {'+'.join(width_label(w) for w in widths):<14} "
            f"{_tokens(job['tokens']):>8} {job['steps']:>9,} {_devices(res):>3} {res['accelerator']:<3} "
            f"{res['mesh_data']:>4} x {res['mesh_latent']:<3} {res['device_bytes'] / 2**30:>8.1f} "
            f"{job['flops'] / 1e15:>10,.1f}")
    rate = result["flop_rate"]
    lines += ["", f"harvest: {result['storage_rows']:,} rows x {result['storage_arrays']} arrays "
                  f"({result['storage_dtype']}) = {_bytes(result['storage_bytes'])}",
              f"training: {result['training_flops']:.3g} FLOPs = {result['device_hours']:,.0f} device-hours at "
              f"{rate['device_flops']:.3g} FLOP/s x {rate['utilisation']:g} utilisation",
              f"harvest writes: ~{result['harvest_write_mib_s_per_node']:,.1f} MiB/s per node "
              f"({result['harvest_workers_per_node']} worker(s) x "
              f"{result['harvest_tokens_per_s_per_worker']:,.0f} tokens/s at the same FLOP rate)"]
    lines += [f"warning: {text}" for text in result.get("warnings", [])]
    return "\n".join(lines)
