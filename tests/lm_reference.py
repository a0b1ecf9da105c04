"""An independent reference for spliced losses: the model run with plain torch forward hooks.

Eval's own splice (`gemmascope.eval.splice`) is what the tests check, so the reference
installs its hooks directly and sums the loss the way SPEC.md section 6 counts it: next
tokens predicted at TEXT positions whose target is TEXT or EOS.
"""

from __future__ import annotations

import numpy as np
import torch

from gemmascope.harvest.packing import ROLE_EOS, ROLE_TEXT


def hooked_loss(loaded, ids: np.ndarray, role: np.ndarray, hooks) -> tuple[float, int]:
    """(summed next-token loss, tokens counted) with `hooks` ((module, forward hook) pairs)
    installed for one forward pass, in float64 from the logits on."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.as_tensor(ids), use_cache=False).logits[:, :-1].double()
    finally:
        for handle in handles:
            handle.remove()
    log_probs = torch.log_softmax(logits, dim=-1)
    counted = (role[:, :-1] == ROLE_TEXT) & np.isin(role[:, 1:], (ROLE_TEXT, ROLE_EOS))
    picked = log_probs.gather(-1, torch.as_tensor(ids[:, 1:])[..., None])[..., 0].numpy()
    return float(-(picked * counted).sum()), int(counted.sum())
