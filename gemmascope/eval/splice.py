"""Replace one site's activation inside a transformers forward pass.

The same hook points as the capture (SPEC.md section 1): `res` replaces the layer's
output, `mlp` the output of post_feedforward_layernorm, `att` the input of o_proj (so
the heads' reconstruction goes through o_proj and the post-attention norm), `embed`
the input of layer 0. Everything upstream of the site runs unchanged.

A transcoder (SPEC.md 5) is spliced IN PLACE of what it predicts: with `source`, the
site's activation is replaced by a function of another site's activation captured
earlier in the same pass (mlp_in -> mlp: the MLP block's output is computed from the
output of pre_feedforward_layernorm by the transcoder instead of by the MLP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gemmascope.models.loading import LoadedModel
from gemmascope.models.sites import SITES, find_submodule


def _register(module, capture: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Hook `fn` on the module's first input ("input") or its output ("output"); a tensor
    returned by `fn` replaces it, None leaves it as it is."""
    if capture == "input":
        def pre_hook(module, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        return module.register_forward_pre_hook(pre_hook)

    def hook(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else output
        new = fn(tensor)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


@contextlib.contextmanager
def splice(loaded: LoadedModel, site: str, layer: int, replace: Callable[[torch.Tensor], torch.Tensor], *,
           source: str | None = None, positions: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, every forward pass has `site`@`layer` replaced by `replace(x)`, x the
    activation of `source`@`layer` in the same pass (default: the site's own activation).

    `positions` (bool [batch, seq]) limits the replacement to those positions; the others
    keep the site's clean activation. A `source` must come before the site in the layer
    (mlp_in before mlp); if its hook has not fired when the site's does, that is an error.
    """
    layer_module = loaded.decoder_layers[layer]
    spec = SITES[site]
    captured: list[torch.Tensor] = []

    def substitute(activation: torch.Tensor) -> torch.Tensor:
        if source is None:
            x = activation
        elif captured:
            x = captured.pop()
        else:
            raise RuntimeError(f"splice: {source} at layer {layer} was not computed before {site}")
        new = replace(x).to(activation.dtype)
        if new.shape != activation.shape:
            raise ValueError(f"splice: the replacement of {site} has shape {tuple(new.shape)}, "
                             f"the site {tuple(activation.shape)}")
        if positions is not None:
            new = torch.where(positions.to(activation.device)[..., None], new, activation)
        return new

    handles = []
    try:
        if source is not None:
            source_spec = SITES[source]

            def keep(activation: torch.Tensor) -> None:
                captured[:] = [activation]

            handles.append(_register(find_submodule(layer_module, source_spec.module), source_spec.capture, keep))
        handles.append(_register(find_submodule(layer_module, spec.module), spec.capture, substitute))
        yield
    finally:
        for handle in handles:
            handle.remove()
