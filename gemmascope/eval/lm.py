"""Delta LM loss by splicing (SPEC.md section 6): the SAE's reconstruction replaces the site.

For each batch of held-out sequences the clean next-token distribution is computed once;
then, per SAE, the forward pass runs again with the site's activation replaced by the
reconstruction (no error term) at the TEXT positions (BOS, EOS and padding keep their
clean activations, which were never harvested), and once with it replaced by zeros
(the zero-ablation baseline). Losses count predictions made at TEXT positions of TEXT
or EOS targets.

A stream is (site, layer) or (site, layer, target): a transcoder's stream (mlp_in, L,
mlp) replaces the TARGET site by the prediction made from the site's activation in the
same pass, i.e. the transcoder stands in for the MLP block, and its zero-ablation
baseline is the target replaced by zeros. A zero-ablation pass is run once per batch for
each (replaced site, layer), so an mlp SAE and an mlp_in -> mlp transcoder of one layer
share it, as every stream shares the clean pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from gemmascope.eval.splice import splice
from gemmascope.faults import crash_point
from gemmascope.harvest.packing import ROLE_EOS, ROLE_TEXT
from gemmascope.models.loading import LoadedModel
from gemmascope.train.release import SKIP_KEY

Reconstruct = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Sums:
    loss: float = 0.0
    kl: float = 0.0


@dataclass
class LMResult:
    tokens: int = 0
    sequences: int = 0
    clean: float = 0.0
    zero: float = 0.0
    spliced: dict[str, _Sums] = field(default_factory=dict)

    def metrics(self, name: str) -> dict:
        spliced = self.spliced[name]
        clean, zero, loss = self.clean / self.tokens, self.zero / self.tokens, spliced.loss / self.tokens
        return {
            "eval_tokens": self.tokens, "eval_sequences": self.sequences,
            "clean_loss": clean, "spliced_loss": loss, "delta_loss": loss - clean,
            "zero_ablation_loss": zero, "kl": spliced.kl / self.tokens,
            "loss_recovered": (zero - loss) / (zero - clean) if zero != clean else float("nan"),
        }


def _log_probs(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids.to(loaded.device), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _summed_loss(log_probs: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor) -> float:
    return float(-(log_probs.gather(-1, targets)[..., 0] * counted).sum())


def stream_sites(key: tuple) -> tuple[str, int, str]:
    """(site, layer, target) of a stream key (site, layer) or (site, layer, target)."""
    site, layer, *rest = key
    return site, layer, rest[0] if rest else site


def lm_metrics(loaded: LoadedModel, batches: Sequence[tuple[np.ndarray, np.ndarray]],
               streams: dict[tuple, dict[str, Reconstruct]], progress: bool = False) -> dict[tuple, LMResult]:
    """Clean, zero-ablated and spliced losses summed over `batches` of (ids [B, T], role [B, T]),
    for every stream and each of its SAEs; the clean pass is shared by all, the zero-ablated
    pass by the streams that replace the same (site, layer).

    A stream key is (site, layer): each reconstruction maps the site's activation to its
    replacement; or (site, layer, target): it maps the site's activation to the target's
    replacement (a transcoder, spliced in place of the target)."""
    results = {key: LMResult(spliced={name: _Sums() for name in saes}) for key, saes in streams.items()}
    replaced = {(target, layer) for site, layer, target in map(stream_sites, streams)}
    passes = 1 + len(replaced) + sum(len(saes) for saes in streams.values())
    bar = tqdm(total=len(batches) * passes, desc="eval LM", unit="pass", disable=not progress)
    for ids_np, role_np in batches:
        crash_point("eval.batch")
        ids = torch.as_tensor(ids_np, dtype=torch.long)
        role = torch.as_tensor(role_np)
        text = (role == ROLE_TEXT).to(loaded.device)
        counted = (role[:, :-1] == ROLE_TEXT) & ((role[:, 1:] == ROLE_TEXT) | (role[:, 1:] == ROLE_EOS))
        counted = counted.to(loaded.device)
        targets = ids[:, 1:].to(loaded.device)[..., None]
        clean = _log_probs(loaded, ids)
        clean_loss = _summed_loss(clean, targets, counted)
        clean_probs = clean.exp()
        bar.update(1)
        zero: dict[tuple[str, int], float] = {}
        for target, layer in sorted(replaced):
            with splice(loaded, target, layer, torch.zeros_like, positions=text):
                zero[(target, layer)] = _summed_loss(_log_probs(loaded, ids), targets, counted)
            bar.update(1)
        for key, saes in streams.items():
            site, layer, target = stream_sites(key)
            source = None if target == site else site
            result = results[key]
            result.clean += clean_loss
            result.zero += zero[(target, layer)]
            for name, reconstruct in saes.items():
                with splice(loaded, target, layer, reconstruct, source=source, positions=text):
                    spliced = _log_probs(loaded, ids)
                kl = (clean_probs * (clean - spliced)).sum(-1)
                result.spliced[name].loss += _summed_loss(spliced, targets, counted)
                result.spliced[name].kl += float((kl * counted).sum())
                bar.update(1)
            result.tokens += int(counted.sum())
            result.sequences += len(ids)
    bar.close()
    return results


def released_reconstruction(released: dict[str, np.ndarray], k: int | None = None) -> Reconstruct:
    """x -> x_hat of a released JumpReLU SAE on raw activations, in torch (float32); with `k`,
    of a TopK SAE (each position keeps its k largest pre-activations, then ReLU). For a
    transcoder x is its input and the result its prediction of the target, plus x @ W_skip
    for a skip transcoder."""
    W_enc, W_dec, b_enc, b_dec = (torch.from_numpy(np.ascontiguousarray(released[name]))
                                  for name in ("W_enc", "W_dec", "b_enc", "b_dec"))
    threshold = None if k is not None else torch.from_numpy(np.ascontiguousarray(released["threshold"]))
    W_skip = torch.from_numpy(np.ascontiguousarray(released[SKIP_KEY])) if SKIP_KEY in released else None

    def reconstruct(activation: torch.Tensor) -> torch.Tensor:
        pre = activation.float() @ W_enc.to(activation.device) + b_enc.to(activation.device)
        if k is None:
            f = pre * (pre > threshold.to(activation.device))
        else:
            top = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp(min=0))
        out = f @ W_dec.to(activation.device) + b_dec.to(activation.device)
        return out if W_skip is None else out + activation.float() @ W_skip.to(activation.device)

    return reconstruct
