"""Replace one site's activation inside a transformers forward pass.

The same hook points as the capture (SPEC.md section 1): `res` replaces the layer's
output, `mlp` the output of post_feedforward_layernorm, `att` the input of o_proj (so
the heads' reconstruction goes through o_proj and the post-attention norm), `embed`
the input of layer 0. Everything upstream of the site runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from gemmascope.models.loading import LoadedModel
from gemmascope.models.sites import SITES, find_submodule


@contextlib.contextmanager
def splice(loaded: LoadedModel, site: str, layer: int,
           replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward pass has `site`@`layer` replaced by `replace(activation)`."""
    spec = SITES[site]
    module = find_submodule(loaded.decoder_layers[layer], spec.module)
    if spec.capture == "input":
        def pre_hook(module, args):
            return (replace(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (replace(output[0]), *output[1:])
            return replace(output)

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
