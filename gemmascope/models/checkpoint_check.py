"""Check a checkpoint's tensor names and shapes from its file headers, before any worker starts.

A harvest spreads model loading over many Ray workers; a checkpoint with a missing or
misshapen tensor should stop the run once, on the driver, with the tensor's name, not
fail in every worker (transformers would even fill a missing tensor with random values
and carry on). Reading safetensors headers costs milliseconds and no weights.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from gemmascope.config import ModelConfig
from gemmascope.errors import UserError
from gemmascope.models.jax_gemma.architecture import from_hf_config
from gemmascope.models.jax_gemma.model import expected_params
from gemmascope.models.jax_gemma.weights import check_tensors
from gemmascope.models.loading import resolve_source


def check_checkpoint(config: ModelConfig, last_layer: int | None = None) -> None:
    """Every tensor a forward up to `last_layer` (None: all) reads exists with the shape
    config.json implies. Hub ids are skipped (each worker downloads and checks them)."""
    from transformers import AutoConfig

    location = Path(resolve_source(config.source))
    if not location.is_dir():
        return
    hf_config = AutoConfig.from_pretrained(location)
    try:
        arch = from_hf_config(config.source, hf_config)
    except UserError:
        if config.backend == "jax":
            raise
        return  # something only the jax port lacks; transformers checks its own weights
    n_layers = arch.n_layers if last_layer is None else last_layer + 1
    check_tensors(location, expected_params(arch, n_layers, jnp.float32))
