"""Typed, frozen configs for every stage, loaded from YAML with `key=value` overrides.

Each section is a frozen dataclass whose field comments say what the field is for;
`__post_init__` rejects impossible values with the key and the value, and the loader
adds the file name, so any mistake is reported as one line before work starts.
Checks that need the model (a layer past the last one) live in `check_against_model`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from gemmascope import storage
from gemmascope.errors import ConfigError, InvalidValue, UserError
from gemmascope.models.sites import SINGLE_LAYER_SITES, SITES, exists_at
from gemmascope.typed_yaml import apply_override, from_mapping, show, to_mapping


def _check_url(key: str, url: str) -> None:
    """Reject a URL scheme no stage can read or write (s3://, http://) while loading, before
    any stage starts; the storage layer would only notice at its first access."""
    if "\x00" in url:
        raise InvalidValue(key, url, "contains a NUL character, which no file name can")
    try:
        storage.scheme(url)
    except UserError:
        raise InvalidValue(key, url, "unsupported URL scheme (use a path, file://, gs:// or memory://)") from None


@dataclass(frozen=True)
class ModelConfig:
    # "gemma3-270m" (bundled weights), "tiny-gemma2" (random, for tests), a Hugging Face
    # id such as "google/gemma-2-2b", a local or gs:// directory of safetensors, or a .gguf file.
    source: str = "gemma3-270m"
    # "auto": bfloat16 on a GPU, float32 on a CPU (CPUs run bf16 matmuls slowly).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "auto": CUDA when a GPU is visible to the worker, else CPU (jax: JAX's default
    # backend, so TPU hosts use their TPUs). "tpu" needs backend jax.
    device: Literal["auto", "cpu", "cuda", "tpu"] = "auto"
    # Hugging Face revision (branch, tag or commit) for hub ids; ignored otherwise.
    revision: str | None = None
    # Which implementation runs the forward pass of the harvest: "torch" (transformers)
    # or "jax" (Flax, runs on TPUs too). Both read the same checkpoint files and capture
    # the same sites; evaluation splices SAEs into the transformers model either way.
    backend: Literal["torch", "jax"] = "torch"
    # jax backend: devices each attention head group / MLP slice is split over on one
    # host; null: the smallest degree at which the weights fill at most half a device.
    tensor_parallel: int | None = None

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise InvalidValue("source", self.source, "empty model source")
        _check_url("source", self.source)
        if self.device == "tpu" and self.backend != "jax":
            raise InvalidValue("device", self.device, "TPUs run the jax backend only (set model.backend: jax)")
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise InvalidValue("tensor_parallel", self.tensor_parallel, "must be >= 1")


@dataclass(frozen=True)
class SourceConfig:
    # Globs of .txt (one document per file), .jsonl and .parquet files, local or gs://.
    paths: tuple[str, ...] = ()
    # "pydoc": the offline demo corpus, the standard library's documentation as rendered
    # by pydoc; it exists on every machine with Python. Exclusive with `paths`.
    builtin: Literal["pydoc"] | None = None
    # Field holding the text in .jsonl records and .parquet columns.
    text_field: str = "text"
    # Pieces (files, Parquet row groups, pydoc modules) per source shard; a source shard
    # is the unit of tokenisation work.
    pieces_per_shard: int = 1

    def __post_init__(self) -> None:
        if bool(self.paths) == (self.builtin is not None):
            raise InvalidValue(
                "paths", list(self.paths), "give exactly one of source.paths and source.builtin"
            )
        for i, path in enumerate(self.paths):
            _check_url(f"paths[{i}]", path)
        if self.pieces_per_shard < 1:
            raise InvalidValue("pieces_per_shard", self.pieces_per_shard, "must be >= 1")


@dataclass(frozen=True)
class HarvestConfig:
    # Sites to capture (SPEC.md section 1): res, mlp, att, mlp_in.
    sites: tuple[str, ...] = ("res", "mlp", "att")
    # Zero-indexed decoder layers, or "all".
    layers: tuple[int, ...] | Literal["all"] = "all"
    # Tokens per packed sequence, BOS included (Gemma Scope: 1,024).
    context_length: int = 1024
    # Sequences per forward pass.
    batch_size: int = 8
    # Stop after this many stored activation rows (per array); null: the whole corpus.
    max_tokens: int | None = None
    # On-disk dtype of activations; bfloat16 halves storage, float32 is exact.
    store_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # zarr3 (TensorStore, the store the trainer reads) or parquet (for Arrow tools).
    output_format: Literal["zarr3", "parquet"] = "zarr3"
    # Rows per work unit; a unit owns whole storage shards so writers never share objects.
    unit_rows: int = 262144
    # Rows per storage object (zarr3 shard, Parquet file row group).
    shard_rows: int = 16384
    # Rows per inner chunk: the block size of random reads.
    chunk_rows: int = 1024
    # Model workers; null: one per GPU in the cluster, or CPUs / cpus_per_worker without GPUs.
    workers: int | None = None
    # CPUs each worker reserves (and torch threads it uses on a CPU).
    cpus_per_worker: int = 2
    # GPUs each worker reserves when the cluster has GPUs.
    gpus_per_worker: float = 1.0
    # TPU chips each worker reserves on TPU hosts (model.backend jax): a TPU host's chips
    # belong to one process, so this is the chips per host (4 on v4/v5p/v6e hosts).
    tpus_per_worker: int = 4
    # Attempts per work unit before the harvest stops with the unit's error.
    max_attempts: int = 3
    # Harvest workers that share one node's network (GPUs per node / gpus_per_worker, or 1
    # on TPU hosts); `plan` multiplies one worker's write rate by it for the per-node rate.
    workers_per_node: int = 1

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in SITES]
        if unknown:
            raise InvalidValue("sites", unknown[0], f"unknown site (known: {', '.join(SITES)})")
        if not self.sites:
            raise InvalidValue("sites", [], "no sites requested")
        if len(set(self.sites)) != len(self.sites):
            raise InvalidValue("sites", list(self.sites), "a site is listed twice")
        if self.layers != "all":
            if not self.layers:
                raise InvalidValue("layers", [], "no layers requested")
            for i, layer in enumerate(self.layers):
                if layer < 0:
                    raise InvalidValue(f"layers[{i}]", layer, "layer must be >= 0")
            if len(set(self.layers)) != len(self.layers):
                raise InvalidValue("layers", list(self.layers), "a layer is listed twice")
        positive = {
            "context_length": (self.context_length, 2),
            "batch_size": (self.batch_size, 1),
            "unit_rows": (self.unit_rows, 1),
            "shard_rows": (self.shard_rows, 1),
            "chunk_rows": (self.chunk_rows, 1),
            "cpus_per_worker": (self.cpus_per_worker, 1),
            "tpus_per_worker": (self.tpus_per_worker, 1),
            "max_attempts": (self.max_attempts, 1),
            "workers_per_node": (self.workers_per_node, 1),
        }
        for key, (value, low) in positive.items():
            if value < low:
                raise InvalidValue(key, value, f"must be >= {low}")
        for site, layer in SINGLE_LAYER_SITES.items():
            if site in self.sites and self.layers != "all" and layer not in self.layers:
                raise InvalidValue("sites", site, f"{site} exists at layer {layer} only; add {layer} to harvest.layers")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidValue("max_tokens", self.max_tokens, "must be >= 1")
        if self.workers is not None and self.workers < 1:
            raise InvalidValue("workers", self.workers, "must be >= 1")
        if self.gpus_per_worker <= 0:
            raise InvalidValue("gpus_per_worker", self.gpus_per_worker, "must be > 0")
        if self.shard_rows % self.chunk_rows:
            raise InvalidValue("shard_rows", self.shard_rows, "must be a multiple of chunk_rows")
        if self.unit_rows % self.shard_rows:
            raise InvalidValue("unit_rows", self.unit_rows, "must be a multiple of shard_rows")


@dataclass(frozen=True)
class Architecture:
    """What the config and the plan need to know of an SAE architecture (the math is in
    `gemmascope.train.arch`, the training wiring in `gemmascope.train.architectures`)."""

    knob: str  # the SAEGridEntry key holding its sparsity knob, the grid's third axis
    prefix: str  # SAE names are w<width>-<prefix><knob>
    jumprelu_shaped: bool  # exported as a Gemma Scope params.npz (a JumpReLU SAE at inference)


ARCHITECTURES = {
    "jumprelu": Architecture("sparsity", "s", True),  # SPEC.md 2: lambda * L0
    "jumprelu_target_l0": Architecture("l0_targets", "l0_", True),  # SPEC.md 7b: quadratic pull to a target L0
    "topk": Architecture("k", "k", False),  # each row keeps its k largest latents (+ AuxK)
    "batchtopk": Architecture("k", "btk", True),  # the batch keeps B*k; exported with a learned global threshold
    "matryoshka_batchtopk": Architecture("k", "mbtk", True),  # BatchTopK whose nested prefixes reconstruct alone
    "relu_l1": Architecture("sparsity", "l1_", True),  # ReLU + L1 (sparsity = the L1 coefficient); threshold 0
}
# SPEC.md 7b labels L0 targets small (10-20), medium (30-60), big (90-150): each label is its range's middle.
L0_TARGET_LABELS = {"small": 15, "medium": 45, "big": 120}
DEFAULT_SPARSITY = (6e-4,)  # a jumprelu block without `sparsity`: the known point, L0 ~ 50 on 9B layer 20 res


# Transcoders (SPEC.md 5): the (input site, target site) pairs an SAE may read and predict,
# where evaluation can splice the prediction in place of the target in the same layer.
TRANSCODER_PAIRS = {("mlp_in", "mlp")}


def sae_name(width: int, architecture: str, knob: float, skip: bool = False) -> str:
    """An SAE's name within its job: w16384-s0.0006 (JumpReLU, as released runs name them),
    w16384-l0_45, w16384-k32, w16384-btk32, w16384-mbtk32, w16384-l1_0.01; a skip
    transcoder's ends in -skip (w16384-s0.0006-skip), so both kinds share a job."""
    return f"w{width}-{ARCHITECTURES[architecture].prefix}{knob:g}" + ("-skip" if skip else "")


@dataclass(frozen=True)
class SAEGridEntry:
    """One block of the SAE grid: every (site, layer) gets every width x sparsity knob value.

    The knob is the architecture's own: `sparsity` for jumprelu (lambda) and relu_l1 (the
    L1 coefficient), `l0_targets` for jumprelu_target_l0, `k` for topk, batchtopk and
    matryoshka_batchtopk. Giving another architecture's knob is an error, not ignored.
    """

    sites: tuple[str, ...] = ("res",)
    # Zero-indexed layers, or "all" (every layer of the model).
    layers: tuple[int, ...] | Literal["all"] = (6,)
    # Latents per SAE, powers of two (the release layout names them 16k ... 1m).
    widths: tuple[int, ...] = (16384,)
    # "jumprelu" (Gemma Scope), "jumprelu_target_l0" (Gemma Scope 2), "topk", "batchtopk",
    # "matryoshka_batchtopk" or "relu_l1"; their training knobs are in the train section.
    architecture: Literal["jumprelu", "jumprelu_target_l0", "topk", "batchtopk", "matryoshka_batchtopk",
                          "relu_l1"] = "jumprelu"
    # jumprelu: lambda values (Gemma Scope: lambda = 6e-4 gave L0 ~ 50 on 9B layer 20 res;
    # null: [6e-4]). relu_l1: L1 coefficients (required). Other architectures: not allowed.
    sparsity: tuple[float, ...] | None = None
    # jumprelu_target_l0 only: target L0s, integers or the labels small (15), medium (45), big (120).
    l0_targets: tuple[int | Literal["small", "medium", "big"], ...] | None = None
    # topk, batchtopk, matryoshka_batchtopk only: latents kept per row (per row on average for
    # the batch rules), at most the smallest width.
    k: tuple[int, ...] | None = None
    # Training tokens per SAE; null: train.tokens (Gemma Scope: 4B for 2^14, 16B for 2^20, else 8B).
    tokens: int | None = None
    # The site the SAE reconstructs; null: its input site. A transcoder reads mlp_in and
    # reconstructs mlp (SPEC.md section 5), the only pair evaluation can splice.
    target: str | None = None
    # Transcoders only: also learn an affine skip connection x @ W_skip from input to
    # output (Gemma Scope 2's skip transcoders); W_skip starts at zero.
    skip: bool = False
    # Start every SAE of this block from a released JumpReLU SAE (a Gemma Scope params.npz
    # folder or a SAELens folder, local or gs://) instead of the recipe's initialisation;
    # jumprelu and jumprelu_target_l0 only (the others have no thresholds to take).
    init_from: str | None = None

    def __post_init__(self) -> None:
        for key in ("sites", "layers", "widths"):
            if not getattr(self, key):
                raise InvalidValue(key, [], "the SAE grid is empty")
        for site in (*self.sites, *([self.target] if self.target else [])):
            if site not in SITES:
                raise InvalidValue("sites" if site in self.sites else "target", site,
                                   f"unknown site (known: {', '.join(SITES)})")
        if self.layers != "all":
            for i, layer in enumerate(self.layers):
                if layer < 0:
                    raise InvalidValue(f"layers[{i}]", layer, "layer must be >= 0")
        for i, width in enumerate(self.widths):
            if width < 2 or width & (width - 1):
                raise InvalidValue(f"widths[{i}]", width, "must be a power of two (the release layout names widths by it)")
        self._check_knobs()
        self._check_transcoder()
        if self.tokens is not None and self.tokens < 1:
            raise InvalidValue("tokens", self.tokens, "must be >= 1")
        if self.init_from is not None:
            _check_url("init_from", self.init_from)
            if not self.architecture.startswith("jumprelu"):
                raise InvalidValue("init_from", self.init_from, f"a released JumpReLU SAE can start jumprelu and "
                                   f"jumprelu_target_l0 SAEs only, not {self.architecture}")

    def _check_knobs(self) -> None:
        """Exactly the architecture's own knob, non-empty, each value usable."""
        own = ARCHITECTURES[self.architecture].knob
        for key in ("sparsity", "l0_targets", "k"):
            if key != own and getattr(self, key) is not None:
                raise InvalidValue(key, list(getattr(self, key)), f"not a knob of architecture {self.architecture} "
                                   f"(it takes {own})")
        if self.architecture == "jumprelu" and self.sparsity is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        values = getattr(self, own)
        if values is None:
            raise InvalidValue(own, None, f"architecture {self.architecture} needs {own} values")
        if not values:
            raise InvalidValue(own, [], "the SAE grid is empty")
        for i, value in enumerate(values):
            if own == "sparsity" and value < 0:
                raise InvalidValue(f"sparsity[{i}]", value, "must be >= 0")
            if own != "sparsity" and not isinstance(value, str) and value < 1:
                raise InvalidValue(f"{own}[{i}]", value, "must be >= 1")
            if own == "k" and value > min(self.widths):
                raise InvalidValue(f"k[{i}]", value, f"more than the width {min(self.widths)}")

    def _check_transcoder(self) -> None:
        """A target other than the input makes a transcoder: a pair evaluation can splice, of an
        architecture exported as JumpReLU (TopK has no such form, nor SAELens a TopK transcoder)."""
        transcoded = [site for site in self.sites if self.target not in (None, site)]
        if self.skip and (not transcoded or len(transcoded) < len(self.sites)):
            raise InvalidValue("skip", True, "a skip connection is for transcoders only (every site with a "
                               "target of its own, e.g. sites [mlp_in] with target mlp)")
        for site in transcoded:
            if (site, self.target) not in TRANSCODER_PAIRS:
                raise InvalidValue("target", self.target, f"no transcoder from {site} to {self.target} "
                                   f"(supported: {', '.join(f'{a} -> {b}' for a, b in sorted(TRANSCODER_PAIRS))})")
        if transcoded and self.architecture == "topk":
            raise InvalidValue("architecture", "topk", "a transcoder must be exportable as JumpReLU; use batchtopk")
        if transcoded and self.init_from is not None:
            raise InvalidValue("init_from", self.init_from, "released SAEs can start SAEs only, not transcoders")

    @property
    def knobs(self) -> tuple[float, ...]:
        """The values of the architecture's sparsity knob, labels resolved (target L0s as numbers)."""
        values = getattr(self, ARCHITECTURES[self.architecture].knob)
        return tuple(float(L0_TARGET_LABELS.get(value, value)) for value in values)


@dataclass(frozen=True)
class SweepConfig:
    """How `gemmascope sweep` groups SAEs into jobs, sizes them, and runs them on Ray."""

    # What each job runs on: "gpu" and "tpu" request Ray's GPU / TPU resources, "cpu" none.
    accelerator: Literal["cpu", "gpu", "tpu"] = "cpu"
    # Devices per job (Gemma Scope: a TPUv3 4x2 slice, 8 chips); the mesh spans them.
    devices_per_job: int = 1
    # Memory of one device, and the share of it a job's SAEs may plan to use.
    device_memory_gib: float = 16.0
    memory_fraction: float = 0.8
    # Peak FLOP/s of one device and the share a training step reaches, for the plan's
    # device-hours (Gemma Scope: ~50% MFU on TPUv3).
    device_flops: float = 1.0e12
    utilisation: float = 0.5
    # CPUs each job reserves (its loader and host work).
    cpus_per_job: int = 1
    # SAEs per job at most (null: as many as memory allows).
    max_saes_per_job: int | None = None
    # Attempts per job before it is marked failed (a user error fails it at once).
    max_attempts: int = 3
    # Preemptions a job survives (its node lost, or SIGTERM): each resumes it from its last
    # checkpoint on another node without using an attempt; one more fails the job.
    max_preemptions: int = 20
    # Hosts one job may span: a job whose SAEs do not fit devices_per_job devices of one
    # host runs on 2, 4, ... hosts as one JAX program (devices_per_job on each).
    max_hosts_per_job: int = 1
    # A running job's lease: renewed every heartbeat; another launcher may take the job
    # once the lease has not been renewed for lease_seconds.
    lease_seconds: float = 600.0
    heartbeat_seconds: float = 30.0
    # Run the harvest first when the store is missing or incomplete (else stop and say so).
    harvest: bool = True

    def __post_init__(self) -> None:
        for key in ("devices_per_job", "cpus_per_job", "max_attempts", "max_hosts_per_job"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), "must be >= 1")
        if self.max_preemptions < 0:
            raise InvalidValue("max_preemptions", self.max_preemptions, "must be >= 0")
        for key in ("devices_per_job", "max_hosts_per_job"):
            if getattr(self, key) & (getattr(self, key) - 1):
                raise InvalidValue(key, getattr(self, key), "must be a power of two")
        for key in ("device_memory_gib", "device_flops", "lease_seconds", "heartbeat_seconds"):
            if not getattr(self, key) > 0:
                raise InvalidValue(key, getattr(self, key), "must be > 0")
        for key in ("memory_fraction", "utilisation"):
            if not 0 < getattr(self, key) <= 1:
                raise InvalidValue(key, getattr(self, key), "must be in (0, 1]")
        if self.max_saes_per_job is not None and self.max_saes_per_job < 1:
            raise InvalidValue("max_saes_per_job", self.max_saes_per_job, "must be >= 1")
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise InvalidValue("heartbeat_seconds", self.heartbeat_seconds,
                               f"must be at most half of lease_seconds ({self.lease_seconds:g})")


@dataclass(frozen=True)
class TrainConfig:
    # Training tokens per SAE (Gemma Scope: 4B for 2^14 latents, 8B, 16B for 2^20).
    tokens: int = 4_000_000_000
    batch_size: int = 4096
    # Adam(beta1=0, beta2, eps) at `lr`, cosine warm-up from 0.1*lr over lr_warmup_steps.
    lr: float = 7e-5
    lr_warmup_steps: int = 1000
    # After warm-up (unspecified by Gemma Scope): "none" keeps lr, "cosine" decays to 0.
    lr_decay: Literal["none", "cosine"] = "none"
    # Learning rate of the log-thresholds; null: `lr`. Short runs need a larger one
    # (SPEC.md section 9: thresholds move ~lr per step).
    threshold_lr: float | None = None
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Linear warm-up of lambda from 0.
    sparsity_warmup_steps: int = 10_000
    threshold_init: float = 0.001
    # Straight-through bandwidth, meaningful at unit mean squared norm.
    bandwidth: float = 0.001
    # Rows sampled to estimate the normalisation scalar C (E||x/C||^2 = 1).
    norm_sample_rows: int = 262_144
    # Rows per shuffle bucket (Gemma Scope shuffled in buckets of ~10^6 activations).
    shuffle_rows: int = 1_048_576
    # Rows at the end of the store never trained on (held out for evaluation).
    holdout_rows: int = 0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 100
    # A latent is dead if it has not fired for this many tokens.
    dead_window_tokens: int = 10_000_000
    # Mesh axes: null data = every device not used by "latent".
    mesh_data: int | None = None
    mesh_latent: int = 1
    # Rows with NaN/inf: stop with an error, or skip them and count.
    nonfinite: Literal["error", "skip"] = "error"
    prefetch_batches: int = 4
    # Operand dtype of the step's five matmuls (accumulated in float32; parameters,
    # gradients and optimiser state stay float32). bfloat16 runs them on tensor cores.
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    # On a single CPU device, steps whose active + straight-through-band latents are at
    # most this fraction of the width in every row take the sparse path (same result,
    # work in proportion to the active latents); 0 keeps every step dense.
    sparse_max_density: float = 0.05
    # --- Knobs of the other architectures (saes[].architecture); JumpReLU ignores them.
    # jumprelu_target_l0 (SPEC.md 7b leaves the coefficients unspecified; the equation is
    # arch.TargetL0JumpReLU's): c, the weight of (L0 / target - 1)^2, large so that L0
    # settles within ~1% of the target (its bias is lambda* * target / (2c)); and the
    # linear penalty on latents firing on more than `frequency_threshold` of a batch's rows,
    # priced in units of the L0 term so it can never hold L0 more than about
    # frequency_coefficient * 100% under the target (0 turns it off). Both warm up with
    # lambda. Measured on Gemma 3 270M layer-6 res, width 1024, targets 15/45/120
    # (tests/test_target_l0_gemma3.py): held-out L0 within 10% after a few hundred steps.
    target_l0_coefficient: float = 10.0
    frequency_threshold: float = 0.1
    frequency_coefficient: float = 0.01
    # topk, batchtopk, matryoshka_batchtopk: AuxK (Gao et al. 2024) over the latents dead for
    # dead_window_tokens: the top aux_k of them explain the residual, weighted by
    # aux_coefficient (Gao: 1/32; 0 turns AuxK off).
    aux_k: int = 512
    aux_coefficient: float = 0.03125
    # batchtopk, matryoshka_batchtopk: the EMA rate of the global threshold exported with the
    # SAE (the running smallest kept activation; Bussmann et al.: 0.01).
    threshold_ema_rate: float = 0.01
    # matryoshka_batchtopk: nested prefixes width/2^(levels-1), ..., width/2, width.
    matryoshka_levels: int = 4

    def __post_init__(self) -> None:
        for key in ("tokens", "batch_size", "checkpoint_every", "log_every", "norm_sample_rows",
                    "shuffle_rows", "mesh_latent", "prefetch_batches", "dead_window_tokens", "aux_k",
                    "matryoshka_levels"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), "must be >= 1")
        for key in ("lr", "bandwidth", "threshold_init", "adam_eps", "target_l0_coefficient"):
            if not getattr(self, key) > 0:
                raise InvalidValue(key, getattr(self, key), "must be > 0")
        for key in ("frequency_coefficient", "aux_coefficient"):
            if getattr(self, key) < 0:
                raise InvalidValue(key, getattr(self, key), "must be >= 0")
        for key in ("frequency_threshold", "threshold_ema_rate"):
            if not 0 < getattr(self, key) <= 1:
                raise InvalidValue(key, getattr(self, key), "must be in (0, 1]")
        if self.threshold_lr is not None and not self.threshold_lr > 0:
            raise InvalidValue("threshold_lr", self.threshold_lr, "must be > 0")
        if not 0 <= self.adam_beta2 < 1:
            raise InvalidValue("adam_beta2", self.adam_beta2, "must be in [0, 1)")
        for key in ("lr_warmup_steps", "sparsity_warmup_steps", "holdout_rows"):
            if getattr(self, key) < 0:
                raise InvalidValue(key, getattr(self, key), "must be >= 0")
        if self.mesh_data is not None and self.mesh_data < 1:
            raise InvalidValue("mesh_data", self.mesh_data, "must be >= 1")
        if not 0 <= self.sparse_max_density <= 1:
            raise InvalidValue("sparse_max_density", self.sparse_max_density, "must be in [0, 1]")
        if not 0 <= self.seed < 2**32:
            # JAX keys hold 32 bits: larger seeds would silently share a stream.
            raise InvalidValue("seed", self.seed, "must be in [0, 2**32)")
        if self.shuffle_rows < self.batch_size:
            raise InvalidValue("shuffle_rows", self.shuffle_rows, f"must be >= batch_size ({self.batch_size})")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on held-out data (the last train.holdout_rows rows of the store)."""

    # Held-out sequences for the LM metrics (Gemma Scope: 2,048 sequences of 1,024 tokens).
    sequences: int = 2048
    # Sequences per forward pass (the logits of a 256k vocabulary are large).
    batch_size: int = 2
    # Held-out activation rows for L0, FVU and densities; null: all of them.
    max_rows: int | None = None
    # A latent firing on more than this share of tokens is dense (SPEC.md section 6).
    dense_threshold: float = 0.1

    def __post_init__(self) -> None:
        for key in ("sequences", "batch_size"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), "must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise InvalidValue("max_rows", self.max_rows, "must be >= 1")
        if not 0 < self.dense_threshold < 1:
            raise InvalidValue("dense_threshold", self.dense_threshold, "must be in (0, 1)")


@dataclass(frozen=True)
class ReportConfig:
    """The HTML report (RUN/report/index.html)."""

    # Latents shown per SAE (a seeded sample of those that fire on held-out data).
    features: int = 8
    # Top-activating contexts per latent.
    examples: int = 8

    def __post_init__(self) -> None:
        for key in ("features", "examples"):
            if getattr(self, key) < 1:
                raise InvalidValue(key, getattr(self, key), "must be >= 1")


@dataclass(frozen=True)
class StorageConfig:
    """How the activation store is read and written: TensorStore request parallelism and
    the per-node bandwidth `plan` checks the harvest against. Scheduling only: none of it
    changes a stored value, so none of it is part of the harvest fingerprint."""

    # Concurrent HTTP requests TensorStore keeps in flight to GCS per process (its
    # `gcs_request_concurrency` context resource; TensorStore's own default is 32). A shard
    # write or a block read is one request, so this bounds a harvest worker's and a
    # loader's parallel transfers to gs:// stores.
    gcs_request_concurrency: int = 32
    # Concurrent local file operations (TensorStore's `file_io_concurrency`); null:
    # TensorStore's default, max(4, CPU count).
    file_io_concurrency: int | None = None
    # Write bandwidth one node may spend on the harvest, in MiB/s; `plan` warns when the
    # estimated harvest write rate per node exceeds it. Assumption behind the default: a
    # GCP VM reaches GCS at several Gbit/s (per-VM egress is 2 Gbit/s per vCPU, capped at
    # 16-32 Gbit/s without Tier_1 networking), so ~8 Gbit/s = 1000 MiB/s is a safe budget.
    # null: no check.
    node_write_bandwidth_mib_s: float | None = 1000.0

    def __post_init__(self) -> None:
        if self.gcs_request_concurrency < 1:
            raise InvalidValue("gcs_request_concurrency", self.gcs_request_concurrency, "must be >= 1")
        if self.file_io_concurrency is not None and self.file_io_concurrency < 1:
            raise InvalidValue("file_io_concurrency", self.file_io_concurrency, "must be >= 1")
        if self.node_write_bandwidth_mib_s is not None and not self.node_write_bandwidth_mib_s > 0:
            raise InvalidValue("node_write_bandwidth_mib_s", self.node_write_bandwidth_mib_s, "must be > 0")


@dataclass(frozen=True)
class Config:
    # Where every output of the run goes: a local path, file://, gs:// or memory:// URL.
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceConfig = field(default_factory=lambda: SourceConfig(builtin="pydoc"))
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    # The SAE grid: a list of blocks, each a sites x layers x widths x sparsity product.
    saes: tuple[SAEGridEntry, ...] = (SAEGridEntry(),)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Store I/O parallelism and bandwidth (scheduling only: not part of any fingerprint).
    storage: StorageConfig = field(default_factory=StorageConfig)
    # The file this config came from (for error messages); not part of its identity.
    origin: str = field(default="<defaults>", compare=False)

    def __post_init__(self) -> None:
        if not self.saes:
            raise InvalidValue("saes", [], "the SAE grid is empty")
        for i, entry in enumerate(self.saes):
            tokens = entry.tokens or self.train.tokens
            if tokens < self.train.batch_size:  # zero steps: the "trained" SAE would be its initialisation
                key = f"saes[{i}].tokens" if entry.tokens else "train.tokens"
                raise InvalidValue(key, tokens, f"less than one batch (train.batch_size={self.train.batch_size})")
            levels = self.train.matryoshka_levels
            if entry.architecture == "matryoshka_batchtopk" and min(entry.widths) < 2 ** (levels - 1):
                raise InvalidValue(f"saes[{i}].widths", list(entry.widths), f"matryoshka_batchtopk halves the width "
                                   f"{levels - 1} times (train.matryoshka_levels={levels}): widths must be "
                                   f">= {2 ** (levels - 1)}")
        if not self.run_dir.strip():
            raise InvalidValue("run_dir", self.run_dir, "empty run directory")
        _check_url("run_dir", self.run_dir)

    def harvest_identity(self) -> dict:
        """Everything that decides the harvested rows (not how many workers compute them)."""
        scheduling = ("workers", "cpus_per_worker", "gpus_per_worker", "tpus_per_worker", "max_attempts",
                      "workers_per_node")
        return {
            "model": {k: v for k, v in to_mapping(self.model).items() if k != "tensor_parallel"},
            "source": to_mapping(self.source),
            "harvest": {k: v for k, v in to_mapping(self.harvest).items() if k not in scheduling},
        }

    def harvest_fingerprint(self) -> str:
        """A hash of `harvest_identity`: a store resumes only under the config that made it."""
        blob = json.dumps(self.harvest_identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_against_model(config: Config, name: str, n_layers: int) -> None:
    """The checks that need the model's depth: every harvested layer must exist in it."""
    if config.harvest.layers == "all":
        return
    for i, layer in enumerate(config.harvest.layers):
        if layer >= n_layers:
            raise ConfigError(f"{config.origin}: harvest.layers[{i}]={layer}: layer out of range "
                              f"({name} has {n_layers} layers, 0..{n_layers - 1})")


def harvest_keys(harvest: HarvestConfig, n_layers: int) -> list[tuple[str, int]]:
    """The (site, layer) arrays a harvest writes, in layer order."""
    layers = range(n_layers) if harvest.layers == "all" else harvest.layers
    return [(site, layer) for layer in layers for site in harvest.sites if exists_at(site, layer)]


def _parse_override(text: str, source: str) -> tuple[str, object]:
    """`key=value` with the value read as YAML; text that is not YAML stays a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"{source}: override {show(text)}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key.strip(), raw
    except RecursionError:
        raise ConfigError(f"{source}: override {show(text)}: value nested too deeply") from None


def _read_text(path: str | Path, source: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not a text file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot read config file ({err.strerror})") from None


def _parse_yaml(text: str, source: str) -> object:
    """`yaml.safe_load` (no code runs), with its failures as one-line errors naming the file."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: YAML nested too deeply") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, and validate everything."""
    source = str(path)
    data = _parse_yaml(_read_text(path, source), source)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        key, value = _parse_override(item, source)
        apply_override(data, key, value, source=source)
    data["origin"] = source
    config = from_mapping(Config, data, source=source)
    _check_run_dir(config)
    return config


def _check_run_dir(config: Config) -> None:
    """A local run_dir that is a file would fail deep inside a stage, after work has started."""
    if storage.scheme(config.run_dir) == "file" and Path(storage.normalize(config.run_dir)).is_file():
        raise ConfigError(f"{config.origin}: run_dir={show(config.run_dir)}: is a file, not a directory")

