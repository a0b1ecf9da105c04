"""SAELens's on-disk format: sae_weights.safetensors + cfg.json (architecture "jumprelu" or "topk").

Released parameters take raw activations with the pre-encoder bias folded into b_enc,
which SAELens expresses as apply_b_dec_to_input = false and normalize_activations =
"none"; the hook names are TransformerLens's (SPEC.md section 1), and `att` SAEs read
hook_z, which SAELens flattens over heads (reshape_activations = "hook_z").
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.export.gemma_scope import check_arrays
from gemmascope.models.sites import SITES
from gemmascope.train.release import RELEASE_KEYS

WEIGHTS, CFG = "sae_weights.safetensors", "cfg.json"
TOPK_KEYS = RELEASE_KEYS[:4]  # a TopK SAE has no threshold


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


def saelens_files(arrays: dict[str, np.ndarray], *, site: str, layer: int, model_name: str,
                  context_size: int, dataset: str, k: int | None = None) -> tuple[bytes, bytes]:
    """(sae_weights.safetensors, cfg.json) for released JumpReLU arrays, or with `k` for the four
    arrays of a TopK SAE (SAELens "topk": the k largest pre-activations per row, then ReLU)."""
    if k is None:
        d_in, d_sae = check_arrays(arrays, "SAELens export")
        names, architecture = RELEASE_KEYS, {"architecture": "jumprelu"}
    else:
        d_in, d_sae = check_arrays({**arrays, "threshold": np.zeros_like(arrays["b_enc"])}, "SAELens export")
        names, architecture = TOPK_KEYS, {"architecture": "topk", "k": int(k)}
    cfg = {
        **architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "hook_z" if site == "att" else "none",
        "metadata": {"model_name": model_name, "hook_name": hook_name(site, layer), "hook_head_index": None,
                     "prepend_bos": True, "context_size": context_size, "dataset_path": dataset},
    }
    weights = save_safetensors({name: np.ascontiguousarray(arrays[name]) for name in names})
    return weights, (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode()


def read_saelens(weights: bytes, cfg_bytes: bytes, where: str) -> tuple[dict[str, np.ndarray], str, int]:
    """(released arrays, site, layer) of a SAELens JumpReLU SAE."""
    try:
        cfg = json.loads(cfg_bytes)
        tensors = load_safetensors(weights)
    except (ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{where}: not a SAELens SAE ({err})") from None
    if cfg.get("architecture") != "jumprelu":
        raise UserError(f"{where}: architecture {cfg.get('architecture')!r}; only jumprelu SAEs can be imported")
    if cfg.get("normalize_activations", "none") != "none":
        raise UserError(f"{where}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    arrays = {name: np.asarray(tensors[name], np.float32) for name in RELEASE_KEYS if name in tensors}
    check_arrays(arrays, where)
    if cfg.get("apply_b_dec_to_input", True):  # fold the pre-encoder bias into b_enc
        arrays["b_enc"] = (arrays["b_enc"].astype(np.float64)
                           - arrays["b_dec"].astype(np.float64) @ arrays["W_enc"]).astype(np.float32)
    metadata = cfg.get("metadata") or cfg
    site, layer = site_of_hook(metadata.get("hook_name", ""), where)
    return arrays, site, layer


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
