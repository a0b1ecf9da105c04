"""One jitted step for a group of SAEs on one activation stream.

Each SAE of the group (any widths, each with its own sparsity coefficient) has its own
parameters; the batch is converted and normalised once and shared by all of them, and
the summed loss gives each SAE exactly its own gradient because no parameter is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gemmascope.config import TrainConfig
from gemmascope.train import sparse
from gemmascope.train.jumprelu import JumpReLUParams, init_params
from gemmascope.train.mesh import tree_shardings
from gemmascope.train.optim import (
    make_optimizer,
    remove_parallel_component,
    sparsity_schedule,
    unit_rows,
    warmup_schedule,
)


@dataclass(frozen=True)
class Group:
    d_in: int
    saes: tuple[tuple[int, float], ...]  # (width, sparsity) of each SAE, in job order

    @classmethod
    def of(cls, d_in: int, saes: list[tuple[int, float]]) -> Group:
        return cls(d_in, tuple((int(w), float(s)) for w, s in saes))

    @property
    def size(self) -> int:
        return len(self.saes)

    def name(self, index: int) -> str:
        width, sparsity = self.saes[index]
        return f"w{width}-s{sparsity:g}"


class TrainState(NamedTuple):
    params: tuple[JumpReLUParams, ...]  # one per SAE of the group
    opt_state: Any
    step: jax.Array
    since_fired: tuple[jax.Array, ...]  # [width] steps since each latent last fired, per SAE


def _labels(params: tuple[JumpReLUParams, ...]):
    return tuple(JumpReLUParams("main", "main", "main", "main", "threshold") for _ in params)


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    threshold_lr = lr if config.threshold_lr is None else warmup_schedule(
        config.threshold_lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    return make_optimizer(lr, threshold_lr, config.adam_beta2, config.adam_eps, _labels)


def init_state(group: Group, config: TrainConfig, key: jax.Array) -> TrainState:
    keys = jax.random.split(key, group.size)
    params = tuple(init_params(k, group.d_in, width, config.threshold_init)
                   for k, (width, _) in zip(keys, group.saes, strict=True))
    since_fired = tuple(jnp.zeros(p.b_enc.shape, jnp.int32) for p in params)
    return TrainState(params, build_optimizer(config).init(params), jnp.zeros([], jnp.int32), since_fired)


def sharded_layout(group: Group, config: TrainConfig, mesh) -> tuple[Any, Any]:
    """(abstract state carrying its shardings, the shardings) of a group's state on `mesh`."""
    abstract = jax.eval_shape(lambda key: init_state(group, config, key), jax.random.key(config.seed))
    shardings = tree_shardings(mesh, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def initial_state(group: Group, config: TrainConfig, shardings) -> TrainState:
    """A fresh state, created directly in its shardings (never whole on one device)."""
    init = jax.jit(lambda key: init_state(group, config, key), out_shardings=shardings)
    return init(jax.random.key(config.seed))


def apply_gradients(optimizer: optax.GradientTransformation, params: tuple[JumpReLUParams, ...], opt_state,
                    grads: tuple[JumpReLUParams, ...]) -> tuple[tuple[JumpReLUParams, ...], Any]:
    """One optimiser step under the decoder-norm constraint: the decoder gradient loses its
    component along each row, and the rows are renormalised after the update."""
    grads = tuple(g._replace(W_dec=remove_parallel_component(g.W_dec, p.W_dec))
                  for g, p in zip(grads, params, strict=True))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return tuple(p._replace(W_dec=unit_rows(p.W_dec)) for p in params), opt_state


def make_train_step(group: Group, config: TrainConfig, scale: float, *, use_sparse: bool = False):
    """(state, raw batch [B, d_in]) -> (new state, metrics); pure, for `jax.jit`.

    The SAEs are unrolled, not vmapped: each keeps plain 2-D matmuls, which XLA runs at
    full speed on every backend, while the batch is still converted once for all. Each
    SAE's gradient comes from its own hand-written backward pass (no parameter is
    shared, so the group's summed loss would give the same); with `use_sparse`
    (`sparse.sparse_available`) a step takes the sparse path whenever its activity allows.
    """
    optimizer = build_optimizer(config)
    factor = sparsity_schedule(config.sparsity_warmup_steps)
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    dead_after = max(1, config.dead_window_tokens // config.batch_size)
    inverse_scale = 1.0 / scale

    def train_step(state: TrainState, x_raw: jax.Array):
        x = x_raw.astype(jnp.float32) * inverse_scale
        lam = factor(state.step)

        results = [sparse.value_and_grad(p, x, sparsity * lam, config.bandwidth, config.matmul_dtype,
                                         sparse.capacity(width, config) if use_sparse else None)
                   for p, (width, sparsity) in zip(state.params, group.saes, strict=True)]
        outputs = tuple(out for _, out, _, _ in results)
        grads = tuple(grad for _, _, grad, _ in results)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state, grads)
        since_fired = tuple(jnp.where(out.fired, 0, count + 1)
                            for out, count in zip(outputs, state.since_fired, strict=True))
        metrics = {
            "loss": jnp.stack([out.loss for out in outputs]),
            "mse": jnp.stack([out.mse for out in outputs]),
            "l0": jnp.stack([out.l0 for out in outputs]),
            "fvu": jnp.stack([out.error_sum / out.total_variance for out in outputs]),
            "dead_fraction": jnp.stack([jnp.mean(count >= dead_after) for count in since_fired]),
            "lr": lr(state.step),
            "sparsity_factor": lam,
            "sparse_step": jnp.stack([took for _, _, _, took in results]),
        }
        return TrainState(params, opt_state, state.step + 1, since_fired), metrics

    return train_step
