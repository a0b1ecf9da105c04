"""Capture every requested (site, layer) in one forward pass, and stop after the last layer.

Hooks hand each captured tensor to a `transform` (the harvest gathers the stored
positions and casts to the store dtype right there, so full-size activations are not
kept alive); a hook on the last requested layer raises `_StopForward`, so later layers,
the final norm and the LM head never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from gemmascope.models.loading import LoadedModel
from gemmascope.models.sites import SITES, Key, find_submodule


class _StopForward(Exception):
    """Raised by the hook on the last needed layer; never escapes `capture`."""


def _unwrap(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ActivationCapture:
    """Runs the model's decoder on token ids and returns the activations at `keys`."""

    def __init__(self, loaded: LoadedModel, keys: Iterable[Key]):
        self.loaded = loaded
        self.keys = tuple(sorted(set(keys), key=lambda k: (k[1], k[0])))
        self.last_layer = max(layer for _, layer in self.keys)

    def __call__(
        self,
        input_ids: torch.Tensor,
        transform: Callable[[torch.Tensor], Any] = lambda t: t,
    ) -> dict[Key, Any]:
        captured: dict[Key, Any] = {}
        handles = []
        layers = self.loaded.decoder_layers

        def make_hook(key: Key, from_input: bool):
            def hook(module, args, output=None):
                tensor = args[0] if from_input else _unwrap(output)
                captured[key] = transform(tensor)

            return hook

        def stop(module, args, output):
            raise _StopForward

        try:
            for site, layer in self.keys:
                spec = SITES[site]
                module = find_submodule(layers[layer], spec.module)
                if spec.capture == "input":
                    handles.append(module.register_forward_pre_hook(make_hook((site, layer), True)))
                else:
                    handles.append(module.register_forward_hook(make_hook((site, layer), False)))
            # Registered last, so it runs after the layer's own "res" hook.
            handles.append(layers[self.last_layer].register_forward_hook(stop))
            with torch.inference_mode(), contextlib.suppress(_StopForward):
                self.loaded.model.model(input_ids=input_ids.to(self.loaded.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        missing = [k for k in self.keys if k not in captured]
        if missing:
            raise RuntimeError(f"hooks did not fire for {missing}")
        return captured


def bare_forward(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder alone (all layers, no hooks, no LM head): the harvest's baseline."""
    with torch.inference_mode():
        out = loaded.model.model(input_ids=input_ids.to(loaded.device), use_cache=False)
    return out.last_hidden_state
