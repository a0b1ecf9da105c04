"""The plan's per-device memory estimate against what XLA allocates for the real train step.

For one SAE of every architecture (and a skip transcoder) the step the trainer jits is
compiled for the CPU and its `memory_analysis()` (arguments + temporaries + outputs not
aliased to the donated state) is the reference: the plan must never promise less than
that, and not waste more than twice it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from gemmascope.config import TrainConfig
from gemmascope.sweep.grid import SAESpec, _device_bytes
from gemmascope.train.group import Group, init_state, make_train_step

D, WIDTH, BATCH = 256, 4096, 512
CASES = [("jumprelu", 1e-3, False), ("jumprelu_target_l0", 45, False), ("relu_l1", 0.1, False),
         ("topk", 32, False), ("batchtopk", 32, False), ("matryoshka_batchtopk", 32, False),
         ("jumprelu", 1e-3, True)]


@pytest.mark.parametrize(("architecture", "knob", "skip_transcoder"), CASES)
def test_plan_covers_the_compiled_step(architecture, knob, skip_transcoder):
    config = TrainConfig(batch_size=BATCH, tokens=BATCH * 100)
    group = Group.of(D, [(WIDTH, knob)], [architecture], D if skip_transcoder else None, [skip_transcoder])
    state = jax.eval_shape(lambda key: init_state(group, config, key), jax.random.key(0))
    rows = jax.ShapeDtypeStruct((BATCH, 2 * D if skip_transcoder else D), jnp.float32)
    step = jax.jit(make_train_step(group, config, 1.0), donate_argnums=0)
    memory = step.lower(state, rows).compile().memory_analysis()
    compiled = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes)
    site, target = ("mlp_in", "mlp") if skip_transcoder else ("res", "res")
    spec = SAESpec(site, 0, WIDTH, knob, BATCH * 100, target, None, architecture, skip_transcoder)
    planned = _device_bytes(D, D, [spec], BATCH, 1, 1)
    assert compiled <= planned <= 2.0 * compiled, (planned / 2**20, compiled / 2**20)
