"""SAELens's on-disk format: sae_weights.safetensors + cfg.json (architecture "jumprelu" or "topk",
"jumprelu_transcoder" or "jumprelu_skip_transcoder").

Released parameters take raw activations with the pre-encoder bias folded into b_enc,
which SAELens expresses as apply_b_dec_to_input = false and normalize_activations =
"none"; the hook names are TransformerLens's (SPEC.md section 1), and `att` SAEs read
hook_z, which SAELens flattens over heads (reshape_activations = "hook_z").

A transcoder reads `hook_name` (mlp_in: blocks.L.ln2.hook_normalized) and writes
`hook_name_out` (mlp: blocks.L.hook_mlp_out) with `d_out` outputs; SAELens keeps the
hook fields in "metadata" beside hook_name. Its skip transcoder computes x @ W_skip.T,
so W_skip is stored as [d_out, d_in], the transpose of our params.npz array.

Reading (`read_saelens_any`) also takes SAELens's "standard" (ReLU) SAEs, as JumpReLU
arrays with threshold 0, and "topk" SAEs with their k; both honour apply_b_dec_to_input
by folding b_dec into b_enc, as for "jumprelu".
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import TRANSCODER_WIDTH, check_arrays
from gemmascope.models.sites import SITES
from gemmascope.train.release import RELEASE_KEYS, SKIP_KEY

WEIGHTS, CFG = "sae_weights.safetensors", "cfg.json"
TOPK_KEYS = RELEASE_KEYS[:4]  # a TopK SAE has no threshold
TRANSCODER_ARCHITECTURES = {False: "jumprelu_transcoder", True: "jumprelu_skip_transcoder"}  # by skip
# What `read_saelens_any` reads (SAELens's architecture names).
READABLE = ("jumprelu", "standard", "topk", *TRANSCODER_ARCHITECTURES.values())


def hook_name(site: str, layer: int) -> str:
    return SITES[site].transformer_lens.format(L=layer)


def site_of_hook(name: str, where: str) -> tuple[str, int]:
    for site, spec in SITES.items():
        template = spec.transformer_lens
        head, _, tail = template.partition("{L}")
        if not tail:
            if name == template:
                return site, 0
            continue
        if name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit():
            return site, int(name[len(head):-len(tail)])
    raise UserError(f"{where}: hook {name!r} is not one of this project's sites")


def run_metadata(config) -> dict:
    """What a run's config says in every SAELens cfg it writes: the model, the context
    length and the dataset (keyword arguments of `saelens_files`)."""
    return {"model_name": config.model.source, "context_size": config.harvest.context_length,
            "dataset": ",".join(config.source.paths) or str(config.source.builtin)}


def saelens_files(arrays: dict[str, np.ndarray], *, site: str, layer: int, model_name: str,
                  context_size: int, dataset: str, k: int | None = None,
                  target: str | None = None) -> tuple[bytes, bytes]:
    """(sae_weights.safetensors, cfg.json) for released JumpReLU arrays, or with `k` for the four
    arrays of a TopK SAE (SAELens "topk": the k largest pre-activations per row, then ReLU);
    with a `target` other than `site`, of a JumpReLU (skip) transcoder from `site` to `target`."""
    transcoder = target not in (None, site)
    metadata = {"model_name": model_name, "hook_name": hook_name(site, layer), "hook_head_index": None,
                "prepend_bos": True, "context_size": context_size, "dataset_path": dataset}
    extra: dict = {}
    tensors = {}
    if transcoder:
        if k is not None:
            raise UserError(f"SAELens export: a TopK transcoder ({site} -> {target}) has no SAELens format here")
        d_in, d_sae = check_arrays(arrays, "SAELens export", d_out=TRANSCODER_WIDTH)
        d_out = int(arrays["W_dec"].shape[1])
        skip = SKIP_KEY in arrays
        names, architecture = RELEASE_KEYS, {"architecture": TRANSCODER_ARCHITECTURES[skip]}
        extra["d_out"] = d_out
        metadata.update(hook_name_out=hook_name(target, layer), hook_layer_out=layer, hook_head_index_out=None)
        if skip:
            tensors[SKIP_KEY] = np.ascontiguousarray(arrays[SKIP_KEY].T)  # SAELens: [d_out, d_in]
    elif k is None:
        d_in, d_sae = check_arrays(arrays, "SAELens export")
        names, architecture = RELEASE_KEYS, {"architecture": "jumprelu"}
    else:
        d_in, d_sae = check_arrays({**arrays, "threshold": np.zeros_like(arrays["b_enc"])}, "SAELens export")
        names, architecture = TOPK_KEYS, {"architecture": "topk", "k": int(k)}
    cfg = {
        **architecture, "d_in": d_in, "d_sae": d_sae, **extra, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z" if site == "att" else "none",
        "metadata": metadata,
    }
    tensors.update({name: np.ascontiguousarray(arrays[name]) for name in names})
    weights = save_safetensors(tensors)
    return weights, (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode()


def _parse(weights: bytes, cfg_bytes: bytes, where: str, what: str = "SAELens SAE") -> tuple[dict, dict]:
    """(cfg, tensors) of SAELens files; one line naming `where` when they are not."""
    try:
        cfg = json.loads(cfg_bytes)
        tensors = load_safetensors(weights)
    except (ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{where}: not a {what} ({err})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: not a {what} (its {CFG} is not a JSON object)")
    return cfg, tensors


def _raw_input(cfg: dict, where: str) -> None:
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported")


def _fold_input_bias(arrays: dict[str, np.ndarray], cfg: dict) -> None:
    """SAELens's apply_b_dec_to_input (its default: pre = (x - b_dec) @ W_enc + b_enc) folded
    into b_enc, so the arrays take raw x as released ones do."""
    if cfg.get("apply_b_dec_to_input", True):
        arrays["b_enc"] = (arrays["b_enc"].astype(np.float64)
                           - arrays["b_dec"].astype(np.float64) @ arrays["W_enc"]).astype(np.float32)


def _hook(cfg: dict, where: str) -> tuple[str, int]:
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    return site_of_hook(metadata.get("hook_name", ""), where)


def read_saelens(weights: bytes, cfg_bytes: bytes, where: str) -> tuple[dict[str, np.ndarray], str, int]:
    """(released arrays, site, layer) of a SAELens JumpReLU SAE."""
    return _read_jumprelu(*_parse(weights, cfg_bytes, where), where)


def _read_jumprelu(cfg: dict, tensors: dict, where: str) -> tuple[dict[str, np.ndarray], str, int]:
    if cfg.get("architecture") != "jumprelu":
        raise UserError(f"{where}: architecture {cfg.get('architecture')!r}; only jumprelu SAEs can be imported")
    _raw_input(cfg, where)
    arrays = {name: np.asarray(tensors[name], np.float32) for name in RELEASE_KEYS if name in tensors}
    check_arrays(arrays, where)
    _fold_input_bias(arrays, cfg)
    metadata = cfg.get("metadata") or cfg
    site, layer = site_of_hook(metadata.get("hook_name", ""), where)
    return arrays, site, layer


@dataclass(frozen=True)
class SAELensSAE:
    """What `read_saelens_any` found: release arrays taking raw activations (five for a
    JumpReLU or ReLU SAE, the ReLU's threshold 0; four and `k` for TopK; a transcoder's with
    W_skip [d_in, d_out] for the skip kind), its stream, and our name for its architecture
    ("jumprelu", "relu", "topk"; a transcoder is "jumprelu" with a `target`)."""
    arrays: dict[str, np.ndarray]
    site: str
    layer: int
    architecture: str
    k: int | None = None
    target: str | None = None  # a transcoder's output site; None: an SAE


def _linear_sae(cfg: dict, tensors: dict, where: str) -> dict[str, np.ndarray]:
    """W_enc, W_dec, b_enc, b_dec of a SAELens SAE without thresholds, checked, taking raw x."""
    _raw_input(cfg, where)
    arrays = {name: np.asarray(tensors[name], np.float32) for name in TOPK_KEYS if name in tensors}
    if sorted(arrays) != sorted(TOPK_KEYS):
        raise UserError(f"{where}: expected arrays {', '.join(TOPK_KEYS)}, found {', '.join(sorted(tensors))}")
    check_arrays({**arrays, "threshold": np.zeros_like(arrays["b_enc"])}, where)
    scaling = tensors.get("scaling_factor")
    if scaling is not None and not np.all(np.asarray(scaling) == 1):
        raise UserError(f"{where}: a scaling_factor other than 1 (SAELens finetuning_scaling_factor) is not supported")
    _fold_input_bias(arrays, cfg)
    return arrays


def _topk_k(value, d_sae: int, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= d_sae:
        raise UserError(f"{where}: k={value!r}; a TopK SAE needs an integer k from 1 to its width {d_sae}")
    return value


def read_saelens_any(weights: bytes, cfg_bytes: bytes, where: str) -> SAELensSAE:
    """The SAELens SAE or transcoder in these files, by its cfg's architecture (one of
    `READABLE`; a cfg without one is "standard", as SAELens reads it); anything else is a
    one-line error naming `where` and the architecture."""
    cfg, tensors = _parse(weights, cfg_bytes, where)
    architecture = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
    if architecture == "standard" and activation == "topk":  # older SAELens: TopK as a standard SAE
        kwargs = cfg.get("activation_fn_kwargs") or {}
        architecture, cfg = "topk", {**cfg, "k": kwargs.get("k")}
    elif architecture == "standard" and activation != "relu":
        raise UserError(f"{where}: a standard SAE with activation {activation!r}; only relu (or topk) is supported")
    if architecture == "jumprelu":
        arrays, site, layer = _read_jumprelu(cfg, tensors, where)
        return SAELensSAE(arrays, site, layer, "jumprelu")
    if architecture in TRANSCODER_ARCHITECTURES.values():
        arrays, site, target, layer = _read_transcoder(cfg, tensors, where)
        return SAELensSAE(arrays, site, layer, "jumprelu", target=target)
    if architecture == "standard":
        arrays = _linear_sae(cfg, tensors, where)
        site, layer = _hook(cfg, where)
        return SAELensSAE({**arrays, "threshold": np.zeros_like(arrays["b_enc"])}, site, layer, "relu")
    if architecture == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise UserError(f"{where}: a topk SAE with rescale_acts_by_decoder_norm is not supported")
        arrays = _linear_sae(cfg, tensors, where)
        k = _topk_k(cfg.get("k"), arrays["b_enc"].shape[0], where)
        site, layer = _hook(cfg, where)
        return SAELensSAE(arrays, site, layer, "topk", k=k)
    raise UserError(f"{where}: SAELens architecture {architecture!r} cannot be imported; supported: "
                    f"{', '.join(READABLE)}")


def read_saelens_transcoder(weights: bytes, cfg_bytes: bytes, where: str) -> tuple[dict[str, np.ndarray],
                                                                                  str, str, int]:
    """(released arrays, input site, target site, layer) of a SAELens JumpReLU (skip) transcoder
    as `saelens_files` writes it: W_skip back to [d_in, d_out]."""
    return _read_transcoder(*_parse(weights, cfg_bytes, where, "SAELens transcoder"), where)


def _read_transcoder(cfg: dict, tensors: dict, where: str) -> tuple[dict[str, np.ndarray], str, str, int]:
    architecture = cfg.get("architecture")
    if architecture not in TRANSCODER_ARCHITECTURES.values():
        raise UserError(f"{where}: architecture {architecture!r}; expected "
                        f"{' or '.join(TRANSCODER_ARCHITECTURES.values())}")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get("apply_b_dec_to_input", False):
        raise UserError(f"{where}: a transcoder must take raw activations (normalize_activations none, "
                        "apply_b_dec_to_input false)")
    skip = architecture == TRANSCODER_ARCHITECTURES[True]
    arrays = {name: np.asarray(tensors[name], np.float32) for name in (*RELEASE_KEYS, SKIP_KEY) if name in tensors}
    if skip != (SKIP_KEY in arrays):
        raise UserError(f"{where}: a {architecture} {'needs' if skip else 'has no'} {SKIP_KEY}")
    if skip:
        arrays[SKIP_KEY] = np.ascontiguousarray(arrays[SKIP_KEY].T)
    metadata = {**cfg, **(cfg.get("metadata") or {})}
    check_arrays(arrays, where, d_out=metadata.get("d_out"))
    site, layer = site_of_hook(metadata.get("hook_name", ""), where)
    target, layer_out = site_of_hook(metadata.get("hook_name_out", ""), where)
    if layer_out != layer:
        raise UserError(f"{where}: reads layer {layer} but writes layer {layer_out}; only same-layer transcoders")
    return arrays, site, target, layer


def load_topk(directory: str) -> tuple[dict[str, np.ndarray], int]:
    """(the four release arrays, k) of the SAELens TopK SAE in `directory` (as `saelens_files`
    writes it)."""
    where = storage.join(directory, WEIGHTS)
    try:
        cfg = json.loads(storage.read_bytes(storage.join(directory, CFG)))
        tensors = load_safetensors(storage.read_bytes(where))
    except (ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{directory}: not a SAELens SAE ({err})") from None
    if cfg.get("architecture") != "topk" or not isinstance(cfg.get("k"), int):
        raise UserError(f"{directory}: expected a SAELens topk SAE with an integer k")
    arrays = {name: np.asarray(tensors[name], np.float32) for name in TOPK_KEYS if name in tensors}
    if sorted(arrays) != sorted(TOPK_KEYS):
        raise UserError(f"{where}: expected arrays {', '.join(TOPK_KEYS)}, found {', '.join(sorted(tensors))}")
    return arrays, cfg["k"]
