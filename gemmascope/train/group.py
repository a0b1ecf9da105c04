"""One jitted step for a group of SAEs on one activation stream.

Each SAE of the group (any widths and architectures, each with its own sparsity knob)
has its own parameters; the batch is converted and normalised once and shared by all of
them, and the summed loss gives each SAE exactly its own gradient because no parameter
is shared. Plain JumpReLU SAEs take the hand-written fused/sparse backward pass; the
other architectures take `jax.value_and_grad` of `arch.sae_loss` with their rule (on the
CPU, target-L0 JumpReLU and the TopK family take sparse steps when their activity fits).

A transcoder group (`d_out` set) reads paired rows [input | target], both divided by the
input's constant C (SPEC.md 5); its JumpReLU members (skip or not) take the same fused and
sparse steps with the target, the others differentiate `arch.transcoder_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gemmascope.config import TrainConfig, sae_name
from gemmascope.train import arch, sparse, sparse_topk
from gemmascope.train.architectures import ESTIMATED, JUMPRELU, init_member, rule
from gemmascope.train.jumprelu import encode_pre
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
    saes: tuple[tuple[int, float], ...]  # (width, sparsity knob) of each SAE, in job order
    architectures: tuple[str, ...] = ()  # of each SAE; empty: every SAE is JumpReLU
    d_out: int | None = None  # transcoders: the target's width (None: SAEs, reconstructing the input)
    skips: tuple[bool, ...] = ()  # of each transcoder: has an affine skip W_skip; empty: none has

    @classmethod
    def of(cls, d_in: int, saes: list[tuple[int, float]], architectures: list[str] | None = None,
           d_out: int | None = None, skips: list[bool] | None = None) -> Group:
        saes = tuple((int(w), float(s)) for w, s in saes)
        return cls(d_in, saes, tuple(architectures or (JUMPRELU,) * len(saes)), d_out,
                   tuple(skips or (False,) * len(saes)))

    @property
    def size(self) -> int:
        return len(self.saes)

    @property
    def transcoder(self) -> bool:
        return self.d_out is not None

    def architecture(self, index: int) -> str:
        return self.architectures[index] if self.architectures else JUMPRELU

    def skip(self, index: int) -> bool:
        return bool(self.skips) and self.skips[index]

    def name(self, index: int) -> str:
        width, knob = self.saes[index]
        return sae_name(width, self.architecture(index), knob, self.skip(index))

    @property
    def estimated(self) -> tuple[int, ...]:
        """The SAEs that keep a `ThresholdEstimate`, in group order (TrainState.estimates)."""
        return tuple(i for i in range(self.size) if self.architecture(i) in ESTIMATED)


class TrainState(NamedTuple):
    params: tuple  # one JumpReLUParams (thresholded architectures) or arch.Params per SAE
    opt_state: Any
    step: jax.Array
    since_fired: tuple[jax.Array, ...]  # [width] steps since each latent last fired, per SAE
    # One per SAE of `Group.estimated`: the BatchTopK rules' global threshold, trained
    # state like the parameters (checkpointed, so a resumed job exports the same SAE).
    estimates: tuple[arch.ThresholdEstimate, ...] = ()


class MemberStep(NamedTuple):
    """One SAE's part of a step: its gradients and diagnostics (no gradient flows in these)."""

    grads: Any
    loss: jax.Array
    mse: jax.Array
    l0: jax.Array
    fvu: jax.Array
    fired: jax.Array  # [width] bool
    sparse_step: jax.Array  # whether the sparse JumpReLU path ran
    terms: dict[str, jax.Array]  # the architecture's own terms (`arch.Outputs.terms`)

    @classmethod
    def of(cls, grads, out, sparse_step: jax.Array | bool, terms: dict[str, jax.Array]) -> MemberStep:
        """From a path's diagnostics (`jumprelu.Outputs` or `arch.Outputs`, which share these fields)."""
        return cls(grads, out.loss, out.mse, out.l0, out.error_sum / out.total_variance, out.fired,
                   jnp.asarray(sparse_step, bool), terms)


def _labels(params: tuple):
    """"threshold" on log-thresholds (their own learning rate), "main" elsewhere, nothing
    where an architecture has no such parameter."""
    def label(name: str, value) -> str | None:
        return None if value is None else "threshold" if name == "log_threshold" else "main"

    return tuple(p._replace(**{name: label(name, value) for name, value in p._asdict().items()}) for p in params)


def build_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    threshold_lr = lr if config.threshold_lr is None else warmup_schedule(
        config.threshold_lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    return make_optimizer(lr, threshold_lr, config.adam_beta2, config.adam_eps, _labels)


def init_state(group: Group, config: TrainConfig, key: jax.Array) -> TrainState:
    keys = jax.random.split(key, group.size)
    params = tuple(init_member(k, group.d_in, width, group.architecture(i), config, group.d_out, group.skip(i))
                   for i, (k, (width, _)) in enumerate(zip(keys, group.saes, strict=True)))
    since_fired = tuple(jnp.zeros(p.b_enc.shape, jnp.int32) for p in params)
    estimates = tuple(arch.ThresholdEstimate.zero() for _ in group.estimated)
    return TrainState(params, build_optimizer(config).init(params), jnp.zeros([], jnp.int32), since_fired,
                      estimates)
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


def after_every_read(grads):
    """One SAE's gradients, each made to depend on all of them.

    A donated parameter is updated in place only where XLA can prove that every read of
    it comes first; a read that feeds only other gradients (the decoder in the latent
    gradient, the encoder in b_dec's) need not, so XLA copied W_enc and W_dec each step,
    a parameter-sized pass and buffer each. Adding 0 * (one element of every gradient) to
    each gradient orders all reads before all updates (XLA keeps a float multiplication
    by zero, as NaN * 0 is NaN; an optimisation barrier does not survive to its copy
    insertion). A NaN stays within the SAE that produced it. The price is that an SAE's
    gradients are all alive before its first update: XLA's memory analysis of the step
    still gives less temporary memory at every shape measured with batch >= d_in (984 vs
    1,092 MiB at (2304, 16384, batch 4096), 7.2 vs 8.3 GiB at width 131,072), more only
    where the batch is far below d_in (1.6 vs 1.1 MB at (256, 512, batch 16)).
    """
    leaves, tree = jax.tree.flatten(grads)
    token = 0.0 * sum(leaf[(0,) * leaf.ndim] for leaf in leaves)
    return jax.tree.unflatten(tree, [leaf + token.astype(leaf.dtype) for leaf in leaves])


def apply_gradients(optimizer: optax.GradientTransformation, params: tuple, opt_state,
                    grads: tuple) -> tuple[tuple, Any]:
    """One optimiser step under the decoder-norm constraint: the decoder gradient loses its
    component along each row, and the rows are renormalised after the update."""
    grads = tuple(g._replace(W_dec=remove_parallel_component(g.W_dec, p.W_dec))
                  for g, p in zip(grads, params, strict=True))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return tuple(p._replace(W_dec=unit_rows(p.W_dec)) for p in params), opt_state


def dead_steps(config: TrainConfig) -> int:
    """Steps without firing after which a latent counts as dead (train.dead_window_tokens)."""
    return max(1, config.dead_window_tokens // config.batch_size)


def member_steps(group: Group, config: TrainConfig, *, use_sparse: bool = False):
    """(params, since_fired, x normalised, target normalised, penalty factor) -> one
    `MemberStep` per SAE (the target is x itself for SAEs). The penalty factor scales every
    sparsity penalty: the warm-up factor, times a transcoder's `target_mean_square`.

    The SAEs are unrolled, not vmapped: each keeps plain 2-D matmuls, which XLA runs at
    full speed on every backend. JumpReLU SAEs and transcoders take their hand-written
    backward pass (with `use_sparse`, `sparse.sparse_available`, the sparse path whenever
    the step's activity allows), and with `use_sparse` so do target-L0 JumpReLU SAEs and
    transcoders (`sparse.pairs_value_and_grad` with the rule's penalty; autodiff of the
    rule when a row's pairs do not fit); the others differentiate their wiring's loss
    (`arch.sae_loss`, `arch.transcoder_loss`), with the latents unfired for
    train.dead_window_tokens as AuxK's dead mask. With `use_sparse`, a TopK SAE whose k fits
    train.sparse_max_density x width takes the sparse TopK step (`sparse_topk`), and a
    BatchTopK or Matryoshka BatchTopK SAE the sparse step whenever its busiest row fits.
    """
    dead_after = dead_steps(config)

    def jumprelu_step(params, x, y, knob, width, lam) -> MemberStep:
        _, out, grads, took = sparse.value_and_grad(params, x, knob * lam, config.bandwidth, config.matmul_dtype,
                                                    sparse.capacity(width, config) if use_sparse else None,
                                                    y if group.transcoder else None)
        return MemberStep.of(grads, out, took, {})

    def target_l0_step(params, x, y, knob, width, lam, dead) -> MemberStep:
        target_l0 = rule("jumprelu_target_l0", knob, width, config, lam)
        capacity = sparse.capacity(width, config)
        # One encoder matmul for both branches: the autodiff fallback continues from its vjp.
        encoded = jax.vjp(lambda p: (arch.transcoder_pre if group.transcoder else encode_pre)(p, x), params)
        pre = encoded[0]
        chosen, needed = sparse.select(params, pre, config.bandwidth, capacity)

        def sparse_member_step() -> MemberStep:
            _, out, grads, terms = sparse.pairs_value_and_grad(params, x, y if group.transcoder else None, pre,
                                                               chosen, target_l0.penalty, bandwidth=config.bandwidth,
                                                               tail=True)
            return MemberStep.of(grads, out, True, terms)

        return jax.lax.cond(needed <= capacity, sparse_member_step,
                            lambda: rule_step(params, x, y, knob, width, lam, "jumprelu_target_l0", dead, encoded))

    def topk_step(params, x, knob, dead) -> MemberStep:
        pre, chosen, f_k = sparse_topk.topk_pairs(params, x, int(knob))
        return sparse_member(params, x, pre, chosen, f_k, dead, {})

    def batchtopk_step(params, x, knob, width, lam, dead, architecture) -> MemberStep:
        capacity = sparse.capacity(width, config)
        prefixes = getattr(rule(architecture, knob, width, config, lam), "prefixes", ())
        encoded = jax.vjp(lambda p: encode_pre(p, x), params)
        pre = encoded[0]
        chosen, f_k, most, kept_minimum = sparse_topk.batch_topk_pairs(pre, int(knob), capacity)
        return jax.lax.cond(most <= capacity,
                            lambda: sparse_member(params, x, pre, chosen, f_k, dead, {"kept_minimum": kept_minimum},
                                                  prefixes),
                            lambda: rule_step(params, x, x, knob, width, lam, architecture, dead, encoded))

    def sparse_member(params, x, pre, chosen, f_k, dead, terms, prefixes=()) -> MemberStep:
        _, out, grads, aux_terms = sparse_topk.value_and_grad(params, x, pre, chosen, f_k, config.aux_k,
                                                              config.aux_coefficient, dead, prefixes)
        return MemberStep.of(grads, out, True, {**aux_terms, **terms})

    def rule_step(params, x, y, knob, width, lam, architecture, dead, encoded=None) -> MemberStep:
        """Autodiff of the wiring's loss; `encoded` = (pre, its vjp) when the caller already
        ran the encoder matmul, so the loss is differentiated from the pre-activations on."""
        chosen = rule(architecture, knob, width, config, lam)
        if encoded is not None:
            pre, pre_vjp = encoded
            offset = (lambda p: arch.transcoder_offset(p, x)) if group.transcoder else (lambda p: p.b_dec)
            (_, out), (direct, d_pre) = jax.value_and_grad(
                lambda p, pre: chosen.loss(p, pre, offset(p), y, dead), argnums=(0, 1), has_aux=True)(params, pre)
            grads = jax.tree.map(jnp.add, direct, pre_vjp(d_pre)[0])
        else:
            if group.transcoder:
                loss_fn = jax.value_and_grad(lambda p: arch.transcoder_loss(chosen, p, x, y, dead), has_aux=True)
            else:
                loss_fn = jax.value_and_grad(lambda p: arch.sae_loss(chosen, p, x, dead), has_aux=True)
            (_, out), grads = loss_fn(params)
        return MemberStep.of(grads, out, False, out.terms)

    def steps(params: tuple, since_fired: tuple, x: jax.Array, y: jax.Array, lam: jax.Array) -> list[MemberStep]:
        results = []
        for i, (p, count, (width, knob)) in enumerate(zip(params, since_fired, group.saes, strict=True)):
            architecture = group.architecture(i)
            if architecture == JUMPRELU:
                results.append(jumprelu_step(p, x, y, knob, width, lam))
            elif use_sparse and architecture == "jumprelu_target_l0":
                results.append(target_l0_step(p, x, y, knob, width, lam, count >= dead_after))
            elif (use_sparse and architecture == "topk" and not group.transcoder
                  and int(knob) <= sparse.capacity(width, config)):
                results.append(topk_step(p, x, knob, count >= dead_after))
            elif use_sparse and architecture in ("batchtopk", "matryoshka_batchtopk") and not group.transcoder:
                results.append(batchtopk_step(p, x, knob, width, lam, count >= dead_after, architecture))
            else:
                results.append(rule_step(p, x, y, knob, width, lam, architecture, count >= dead_after))
        return results

    return steps


def make_train_step(group: Group, config: TrainConfig, scale: float, *, use_sparse: bool = False,
                    target_mean_square: float = 1.0):
    """(state, raw batch [B, d_in], for transcoders [B, d_in + d_out]) -> (new state, metrics);
    pure, for `jax.jit`.

    A transcoder's target is divided by its input's C (SPEC.md 5), so its squared error
    is in units of `target_mean_square` = E||y / C||^2 (`normalise.estimate_scale`), not
    1 as an SAE's. Every sparsity penalty of a transcoder group is multiplied by it, so a
    lambda, a target-L0 coefficient or an L1 coefficient prices a latent against the
    same fraction of the target's energy as for an SAE, and one grid serves both.

    Per-SAE metrics are stacked in group order; `terms` holds each SAE's architecture
    terms (AuxK, penalties, and "threshold", the BatchTopK rules' exported threshold at
    training scale), empty for JumpReLU.
    """
    optimizer = build_optimizer(config)
    factor = sparsity_schedule(config.sparsity_warmup_steps)
    lr = warmup_schedule(config.lr, config.lr_warmup_steps, config.steps, config.lr_decay)
    dead_after = dead_steps(config)
    steps = member_steps(group, config, use_sparse=use_sparse)
    inverse_scale = 1.0 / scale

    def train_step(state: TrainState, x_raw: jax.Array):
        rows = x_raw.astype(jnp.float32) * inverse_scale
        x, y = (rows[:, :group.d_in], rows[:, group.d_in:]) if group.transcoder else (rows, rows)
        lam = factor(state.step)
        results = steps(state.params, state.since_fired, x, y, lam * target_mean_square)
        params, opt_state = apply_gradients(optimizer, state.params, state.opt_state,
                                            tuple(after_every_read(r.grads) for r in results))
        since_fired = tuple(jnp.where(r.fired, 0, count + 1)
                            for r, count in zip(results, state.since_fired, strict=True))
        estimates = tuple(estimate.update(results[i].terms["kept_minimum"], config.threshold_ema_rate)
                          for i, estimate in zip(group.estimated, state.estimates, strict=True))
        terms = [dict(r.terms) for r in results]
        for i, estimate in zip(group.estimated, estimates, strict=True):
            terms[i]["threshold"] = estimate.value
        metrics = {
            "loss": jnp.stack([r.loss for r in results]),
            "mse": jnp.stack([r.mse for r in results]),
            "l0": jnp.stack([r.l0 for r in results]),
            "fvu": jnp.stack([r.fvu for r in results]),
            "dead_fraction": jnp.stack([jnp.mean(count >= dead_after) for count in since_fired]),
            "lr": lr(state.step),
            "sparsity_factor": lam,
            "sparse_step": jnp.stack([r.sparse_step for r in results]),
            "terms": tuple(terms),
        }
        return TrainState(params, opt_state, state.step + 1, since_fired, estimates), metrics

    return train_step
