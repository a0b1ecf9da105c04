"""The SAE grid of a config, grouped into jobs that each fit their devices.

A job trains SAEs that read one activation stream (same site, layer, target and token
budget) in one jitted step, so the stream is read once for all of them (SPEC.md
section 7: one data server per (site, layer) feeds the whole lambda grid), whatever
their architectures. SAEs are packed into a job in (width, architecture, sparsity
knob) order while the job still fits `devices_per_job`
devices; a job's latent axis is the smallest power of two that makes its parameters
and optimiser state fit one device's share, and the rest of its devices split the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import groupby

from gemmascope.config import ARCHITECTURES, Config, check_against_model, sae_name
from gemmascope.errors import ConfigError, UserError
from gemmascope.models.loading import ModelInfo
from gemmascope.models.sites import exists_at

GIB = 2**30
# float32 parameters, Adam second moments, gradients and the update's temporaries.
STATE_COPIES = 4
# [batch, width] float32 buffers alive in a step: pre-activations, latents, their
# gradients, masks.
BATCH_BUFFERS = 6
# What AuxK adds for the TopK family: the dead latents' masked scores, their latents and
# those latents' gradient.
AUXK_BUFFERS = 3
AUXK_ARCHITECTURES = frozenset({"topk", "batchtopk", "matryoshka_batchtopk"})


def width_label(width: int) -> str:
    """Gemma Scope's folder name for a width: 16384 -> "16k", 2^20 -> "1m" (small ones as they are)."""
    if width >= 10**6:
        return f"{width // 10**6}m"
    return f"{width // 1000}k" if width >= 1000 else str(width)


@dataclass(frozen=True)
class SAESpec:
    site: str
    layer: int
    width: int
    # The architecture's sparsity knob (`config.ARCHITECTURES`): lambda (jumprelu), the L1
    # coefficient (relu_l1), the target L0 (jumprelu_target_l0) or k (the TopK family).
    sparsity: float
    tokens: int
    target: str  # the reconstructed site; == site unless a transcoder
    init_from: str | None = None  # a released SAE to start from
    architecture: str = "jumprelu"
    skip: bool = False  # a skip transcoder: y_hat also gets x @ W_skip

    @property
    def transcoder(self) -> bool:
        return self.target != self.site

    @property
    def name(self) -> str:
        return sae_name(self.width, self.architecture, self.sparsity, self.skip)


@dataclass(frozen=True)
class Resources:
    accelerator: str  # "cpu", "gpu" or "tpu"
    devices: int  # on each host
    hosts: int  # > 1: one JAX program across hosts, the latent axis spanning them
    mesh_data: int
    mesh_latent: int
    cpus: int
    device_bytes: int  # planned use of each device
    host_bytes: int  # shuffle buffer and prefetched batches

    def ray_options(self) -> dict:
        """What each of the job's hosts asks Ray for."""
        options: dict = {"num_cpus": self.cpus, "memory": self.host_bytes}
        if self.accelerator == "gpu":
            options["num_gpus"] = self.devices
        elif self.accelerator == "tpu":
            options["resources"] = {"TPU": self.devices}
        return options


@dataclass(frozen=True)
class Job:
    id: str
    site: str
    layer: int
    target: str
    d_in: int
    tokens: int
    saes: tuple[SAESpec, ...]
    resources: Resources

    def steps(self, batch_size: int) -> int:
        return self.tokens // batch_size

    def flops(self) -> float:
        """10 x tokens x d_in x width per SAE: two forward and three backward matmuls."""
        return sum(10.0 * s.tokens * self.d_in * s.width for s in self.saes)


def expand(config: Config, info: ModelInfo) -> list[SAESpec]:
    """Every SAE of the grid, in config order; a duplicate is an error."""
    seen: dict[tuple, int] = {}
    saes = []
    for index, entry in enumerate(config.saes):
        layers = range(info.n_layers) if entry.layers == "all" else entry.layers
        for layer in layers:
            if layer >= info.n_layers:
                raise ConfigError(f"{config.origin}: saes[{index}].layers: layer {layer} out of range "
                                  f"({info.name} has {info.n_layers} layers)")
        tokens = entry.tokens or config.train.tokens
        for site in entry.sites:
            for layer in (layer for layer in layers if exists_at(site, layer)):
                for width in entry.widths:
                    for knob in entry.knobs:
                        spec = SAESpec(site, layer, width, knob, tokens, entry.target or site, entry.init_from,
                                       entry.architecture, entry.skip)
                        key = (site, layer, spec.target, spec.name)
                        if key in seen:
                            raise ConfigError(f"{config.origin}: saes[{index}]: {site} layer {layer} SAE {spec.name} "
                                              f"is already in saes[{seen[key]}]")
                        seen[key] = index
                        saes.append(spec)
        if not any(exists_at(site, layer) for site in entry.sites for layer in layers):
            raise ConfigError(f"{config.origin}: saes[{index}]: no SAE: sites {list(entry.sites)} exist at none "
                              f"of the layers (embed exists at layer 0 only)")
    return saes


def _state_bytes(spec: SAESpec, d_in: int, d_out: int) -> int:
    """Parameters and their optimiser copies: encoder, decoder (into the target's width),
    biases, thresholds, and a skip transcoder's W_skip."""
    width = spec.width
    params = d_in * width + width * d_out + 2 * width + d_out + (d_in * d_out if spec.skip else 0)
    return 4 * STATE_COPIES * params


def _batch_bytes(spec: SAESpec, d_in: int, d_out: int, batch: int) -> int:
    """A step's float32 buffers: [batch, width] ones (AuxK's too) and the input/output rows
    with their reconstruction and its gradient."""
    buffers = BATCH_BUFFERS + (AUXK_BUFFERS if spec.architecture in AUXK_ARCHITECTURES else 0)
    return 4 * buffers * batch * spec.width + 4 * 2 * batch * (d_in + d_out)


def _device_bytes(d_in: int, d_out: int, saes: list[SAESpec], batch: int, latent: int, data: int) -> int:
    state = sum(_state_bytes(s, d_in, d_out) for s in saes)
    activations = sum(_batch_bytes(s, d_in, d_out, batch) for s in saes)
    return state // latent + activations // (latent * data)


def _fit(config: Config, d_in: int, d_out: int, saes: list[SAESpec]) -> tuple[int, int, int, int] | None:
    """(hosts, latent, data, bytes per device): the fewest hosts, then the smallest latent axis
    that fits, or None."""
    sweep = config.sweep
    capacity = sweep.device_memory_gib * GIB * sweep.memory_fraction
    hosts = 1
    while hosts <= sweep.max_hosts_per_job:
        devices = sweep.devices_per_job * hosts
        latent = 1
        while latent <= devices:
            data = devices // latent
            used = _device_bytes(d_in, d_out, saes, config.train.batch_size, latent, data)
            if used <= capacity:
                return hosts, latent, data, used
            latent *= 2
        hosts *= 2
    return None


def _host_bytes(config: Config, row_width: int) -> int:
    """The loader's shuffle buffer and prefetched batches (store rows held as float32; a
    transcoder's rows are its input and target side by side)."""
    train = config.train
    return 4 * row_width * (train.shuffle_rows + train.prefetch_batches * train.batch_size) + GIB // 2


def _pack(config: Config, d_in: int, d_out: int, saes: list[SAESpec]) -> list[list[SAESpec]]:
    """Consecutive SAEs of one stream share a job while they fit on as many hosts as each needs
    alone: a narrow SAE never rides on hosts only a wide one needs."""
    limit = config.sweep.max_saes_per_job or len(saes)
    packs: list[list[SAESpec]] = []
    for spec in saes:
        alone = _fit(config, d_in, d_out, [spec])
        if alone is None:
            sweep = config.sweep
            raise ConfigError(
                f"{config.origin}: {spec.site} layer {spec.layer} width {spec.width} does not fit "
                f"{sweep.max_hosts_per_job} host(s) x {sweep.devices_per_job} x {sweep.device_memory_gib:g} GiB "
                f"(sweep.max_hosts_per_job, sweep.devices_per_job, sweep.device_memory_gib); give it more hosts "
                f"or more or bigger devices")
        if packs and len(packs[-1]) < limit:
            together = _fit(config, d_in, d_out, [*packs[-1], spec])
            if together and together[0] == alone[0] == _fit(config, d_in, d_out, packs[-1])[0]:
                packs[-1].append(spec)
                continue
        packs.append([spec])
    return packs


def _job_name(saes: list[SAESpec]) -> str:
    """e.g. res-L12-w16k, res-L12-w32k+65k, mlp_in-L3-to-mlp-w16k."""
    first = saes[0]
    stream = f"{first.site}-L{first.layer}" + ("" if first.target == first.site else f"-to-{first.target}")
    return f"{stream}-w" + "+".join(width_label(w) for w in sorted({s.width for s in saes}))


def _pack_order(spec: SAESpec) -> tuple:
    """Width, then architecture in `ARCHITECTURES` order (JumpReLU first, so a JumpReLU-only
    grid packs, and so names its jobs, as it did before there were other architectures)."""
    return spec.width, list(ARCHITECTURES).index(spec.architecture), spec.sparsity, spec.skip


def plan_jobs(config: Config, info: ModelInfo) -> list[Job]:
    """The jobs of the grid: SAEs grouped by stream, packed to fit, with their resources."""
    saes = expand(config, info)

    def stream(s: SAESpec) -> tuple:
        return (s.site, s.layer, s.target, s.tokens)

    check_harvested(config, info, saes)
    sweep = config.sweep
    jobs: list[Job] = []
    for (site, layer, target, tokens), members in groupby(sorted(saes, key=stream), key=stream):
        d_in, d_out = info.site_width(site), info.site_width(target)
        packs = _pack(config, d_in, d_out, sorted(members, key=_pack_order))
        names = [_job_name(pack) for pack in packs]
        parts = Counter()
        for pack, name in zip(packs, names, strict=True):
            if names.count(name) > 1:
                parts[name] += 1
                name = f"{name}-p{parts[name] - 1}"
            hosts, latent, _, used = _fit(config, d_in, d_out, pack)
            devices = sweep.devices_per_job * hosts
            latent = max(latent, config.train.mesh_latent)
            resources = Resources(sweep.accelerator, sweep.devices_per_job, hosts, max(1, devices // latent),
                                  latent, sweep.cpus_per_job, used,
                                  _host_bytes(config, d_in + (d_out if target != site else 0)))
            jobs.append(Job(name, site, layer, target, d_in, tokens, tuple(pack), resources))
    return jobs


def check_harvested(config: Config, info: ModelInfo, saes: list[SAESpec]) -> None:
    """Every SAE's input and target must be among the harvested (site, layer) arrays."""
    check_against_model(config, info.name, info.n_layers)
    harvest = config.harvest
    layers = range(info.n_layers) if harvest.layers == "all" else harvest.layers
    for spec in saes:
        for site in {spec.site, spec.target}:
            if site not in harvest.sites or spec.layer not in layers:
                raise ConfigError(f"{config.origin}: saes: {site} layer {spec.layer} is not harvested "
                                  f"(harvest.sites={list(harvest.sites)}, harvest.layers="
                                  f"{harvest.layers if harvest.layers == 'all' else list(harvest.layers)})")


def find_job(jobs: list[Job], job_id: str, origin: str) -> Job:
    for job in jobs:
        if job.id == job_id:
            return job
    raise UserError(f"{origin}: no job {job_id!r} (jobs: {', '.join(job.id for job in jobs)})")
