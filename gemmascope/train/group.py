"""One jitted step for a group of SAEs on one activation stream.

SAEs of equal width are stacked along a leading axis and run under `vmap` (each with
its own sparsity coefficient); different widths are separate stacks in the same step.
The batch is converted and normalised once, then shared by every SAE; the summed loss
gives each SAE exactly its own gradient because no parameter is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemmascope.config import TrainConfig
from gemmascope.train.jumprelu import JumpReLUParams, init_params, loss_fn
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
    # width -> sparsity coefficients of the SAEs of that width, in job order
    members: tuple[tuple[int, tuple[float, ...]], ...]

    @classmethod
    def of(cls, d_in: int, saes: list[tuple[int, float]]) -> Group:
        by_width: dict[int, list[float]] = {}
        for width, sparsity in saes:
            by_width.setdefault(width, []).append(sparsity)
        return cls(d_in, tuple((w, tuple(s)) for w, s in by_width.items()))

    @staticmethod
    def key(width: int) -> str:
        return f"w{width}"

    @property
    def size(self) -> int:
        return sum(len(s) for _, s in self.members)


class TrainState(NamedTuple):
    params: dict[str, JumpReLUParams]  # stacked [n_saes_of_width, ...] per width
    opt_state: Any
    step: jax.Array
    since_fired: dict[str, jax.Array]  # [n_saes_of_width, width] steps since each latent fired


def _labels(params: dict[str, JumpReLUParams]):
    return {k: JumpReLUParams("main", "main", "main", "main", "threshold") for k in params}


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    threshold_lr = lr if config.threshold_lr is None else warmup_schedule(
        config.threshold_lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    return make_optimizer(lr, threshold_lr, config.adam_beta2, config.adam_eps, _labels)


def init_state(group: Group, config: TrainConfig, key: jax.Array) -> TrainState:
    params = {}
    for index, (width, sparsities) in enumerate(group.members):
        keys = jax.random.split(jax.random.fold_in(key, index), len(sparsities))
        stacked = [init_params(k, group.d_in, width, config.threshold_init) for k in keys]
        params[Group.key(width)] = jax.tree.map(lambda *xs: jnp.stack(xs), *stacked)
    optimizer = build_optimizer(config)
    since_fired = {k: jnp.zeros(p.b_enc.shape, jnp.int32) for k, p in params.items()}
    return TrainState(params, optimizer.init(params), jnp.zeros([], jnp.int32), since_fired)


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


def make_train_step(group: Group, config: TrainConfig, scale: float):
    """(state, raw batch [B, d_in]) -> (new state, metrics); pure, for `jax.jit`."""
    optimizer = build_optimizer(config)
    factor = sparsity_schedule(config.sparsity_warmup_steps)
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    sparsities = {Group.key(w): np.asarray(s, np.float32) for w, s in group.members}
    dead_after = max(1, config.dead_window_tokens // config.batch_size)
    inverse_scale = 1.0 / scale

    def train_step(state: TrainState, x_raw: jax.Array):
        x = x_raw.astype(jnp.float32) * inverse_scale
        lam = factor(state.step)

        def total_loss(params):
            total, outputs = 0.0, {}
            for key, stacked in params.items():
                losses, out = jax.vmap(loss_fn, in_axes=(0, None, 0, None))(
                    stacked, x, sparsities[key] * lam, config.bandwidth)
                total = total + jnp.sum(losses)
                outputs[key] = out
            return total, outputs

        (_, outputs), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
        grads = {k: g._replace(W_dec=remove_parallel_component(g.W_dec, state.params[k].W_dec))
                 for k, g in grads.items()}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = {k: p._replace(W_dec=unit_rows(p.W_dec)) for k, p in params.items()}
        since_fired = {k: jnp.where(outputs[k].fired, 0, state.since_fired[k] + 1) for k in params}
        metrics = {
            k: {
                "loss": out.loss,
                "mse": out.mse,
                "l0": out.l0,
                "fvu": out.error_sum / out.total_variance,
                "dead_fraction": jnp.mean(since_fired[k] >= dead_after, axis=-1),
            }
            for k, out in outputs.items()
        }
        metrics["lr"] = lr(state.step)
        metrics["sparsity_factor"] = lam
        return TrainState(params, opt_state, state.step + 1, since_fired), metrics

    return train_step
