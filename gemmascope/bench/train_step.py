"""`gemmascope bench train-step`: the JumpReLU training step against this machine's matmul rate.

A dense JumpReLU step is counted as 10 * batch * d_in * width FLOPs (two forward
matmuls, three backward: the encoder input needs no gradient), and compared with a
plain [batch, d_in] x [d_in, width] float32 matmul timed in the same run. With
`--group G` the step trains G SAEs at once, and a single-SAE step is timed too, so the
cost of sharing one batch across G SAEs is reported as a ratio to G single steps.

Two ceilings explain the gap between the step and the reference matmul, both measured in
the same run: the step's own five matmul shapes timed alone (the weight gradients
contract over the batch, which runs slower than the reference at small batches), and the
optimiser's memory floor: Adam must read parameters, gradients and second moments and
write parameters and moments, 20 bytes per parameter per step, at the machine's
streaming bandwidth, and no matmul hides that traffic.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemmascope.bench import add_sae_shape, fraction, positive_float, positive_int
from gemmascope.config import TrainConfig
from gemmascope.errors import UserError
from gemmascope.train.architectures import JUMPRELU
from gemmascope.train.group import Group, initial_state, make_train_step, sharded_layout
from gemmascope.train.jumprelu import batch_major
from gemmascope.train.mesh import batch_sharding, make_mesh


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train-step", help="SAE training steps/s and FLOP/s against matmul FLOP/s")
    add_sae_shape(parser)
    parser.add_argument("--group", type=positive_int, default=1, help="SAEs trained together on each batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the activations fed to the step (the store's dtype)")
    parser.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="operand dtype of the step's matmuls (train.matmul_dtype)")
    parser.add_argument("--peak-flops", type=positive_float, default=None,
                        help="the device's peak FLOP/s for MFU (default: known bf16 peaks of H100/H200/A100)")
    parser.add_argument("--l0-fraction", type=fraction, default=None,
                        help="set thresholds for this L0 / width and time the sparse step beside the dense one")
    parser.add_argument("--d-out", type=positive_int, default=None,
                        help="with --l0-fraction: time a JumpReLU transcoder from d_in to this width instead")
    parser.add_argument("--target-l0", type=positive_float, default=None, metavar="T",
                        help="with --l0-fraction: time a target-L0 JumpReLU SAE (or transcoder) with target T")
    kept = parser.add_mutually_exclusive_group()
    kept.add_argument("--topk", type=positive_int, default=None, metavar="K",
                      help="time a TopK SAE with K latents per row, its sparse step beside its dense one")
    kept.add_argument("--batchtopk", type=positive_int, default=None, metavar="K",
                      help="the same for a BatchTopK SAE keeping K latents per row on average")
    kept.add_argument("--matryoshka", type=positive_int, default=None, metavar="K",
                      help="the same for a Matryoshka BatchTopK SAE (4 nested prefixes)")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--rounds", type=positive_int, default=2,
                        help="alternate the step and its references this many times, keeping the best of each, "
                             "so a slow spell of a shared machine does not bias the ratios")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def best_seconds(fn, repeats: int) -> float:
    """Best seconds per call over `repeats` calls (after one warm-up call)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - began)
    return best


# Dense bfloat16 tensor-core peaks (FLOP/s) of the cards MFU is usually quoted against.
BF16_PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def known_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in BF16_PEAKS.items() if name in kind), None)


def with_density(state, x: jax.Array, fraction: float):
    """`state` with each latent's threshold at its (1 - fraction) quantile on `x`: L0 = fraction x width."""
    params = []
    for p in state.params:
        pre = np.asarray(x.astype(jnp.float32) @ p.W_enc)
        theta = np.maximum(np.quantile(pre, 1.0 - fraction, axis=0), 1e-3).astype(np.float32)
        params.append(p._replace(log_threshold=jax.device_put(np.log(theta), p.log_threshold.sharding)))
    return state._replace(params=tuple(params))


def compiled_step(d_in: int, width: int, batch: int, group: int, dtype: str, matmul_dtype: str = "float32",
                  l0_fraction: float | None = None, use_sparse: bool = False, architecture: str = JUMPRELU,
                  knob: float = 1e-3, d_out: int | None = None) -> tuple[Callable[[], jax.Array], dict]:
    """(a thunk running one training step of a group of `architecture` SAEs, the i-th with
    sparsity knob `knob` x i, on a fixed random batch; the holder of its state and last
    metrics). With `l0_fraction`, JumpReLU thresholds are set for that activity; with
    `d_out`, the group holds transcoders to that width (rows [input | target])."""
    config = TrainConfig(tokens=batch * 10**6, batch_size=batch, shuffle_rows=batch, sparsity_warmup_steps=1,
                         matmul_dtype=matmul_dtype)
    members = Group.of(d_in, [(width, knob * (i + 1)) for i in range(group)], [architecture] * group, d_out=d_out)
    mesh = make_mesh(config)
    _, shardings = sharded_layout(members, config, mesh)
    state = initial_state(members, config, shardings)
    step = jax.jit(make_train_step(members, config, scale=1.0, use_sparse=use_sparse),
                   in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0)
    x = jax.random.normal(jax.random.key(1), (batch, d_in + (d_out or 0)), jnp.float32).astype(dtype)
    if l0_fraction is not None:
        state = with_density(state, x[:, :d_in], l0_fraction)
    holder = {"state": state}

    def one_step():
        holder["state"], holder["metrics"] = step(holder["state"], x)
        return holder["state"].step

    return one_step, holder


def step_seconds(d_in: int, width: int, batch: int, group: int, dtype: str, steps: int,
                 matmul_dtype: str = "float32", l0_fraction: float | None = None, use_sparse: bool = False,
                 measured: dict | None = None, architecture: str = JUMPRELU, knob: float = 1e-3,
                 d_out: int | None = None) -> float:
    """Best seconds per step of `compiled_step`; `measured` receives the last step's L0 and
    whether every SAE of it took the sparse path."""
    one_step, holder = compiled_step(d_in, width, batch, group, dtype, matmul_dtype, l0_fraction, use_sparse,
                                     architecture, knob, d_out)
    seconds = best_seconds(one_step, steps)
    if measured is not None:
        measured["l0"] = float(np.mean(holder["metrics"]["l0"]))
        measured["sparse_step"] = bool(np.all(holder["metrics"]["sparse_step"]))
    return seconds


def matmul_flops_per_s(d_in: int, width: int, batch: int, repeats: int, dtype: str = "float32") -> float:
    x = jax.random.normal(jax.random.key(2), (batch, d_in), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(3), (d_in, width), jnp.float32).astype(dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    return 2.0 * batch * d_in * width / best_seconds(lambda: matmul(x, w), repeats)


def step_matmul_seconds(d_in: int, width: int, batch: int, repeats: int, dtype: str = "float32") -> float:
    """Seconds of the five matmuls of one dense step, each timed alone, summed."""
    keys = jax.random.split(jax.random.key(4), 5)
    x = jax.random.normal(keys[0], (batch, d_in), jnp.float32).astype(dtype)  # inputs, and the error
    f = jax.random.normal(keys[1], (batch, width), jnp.float32).astype(dtype)  # latents, and their gradient
    w_enc = jax.random.normal(keys[2], (d_in, width), jnp.float32).astype(dtype)
    w_dec = jax.random.normal(keys[3], (width, d_in), jnp.float32).astype(dtype)
    shapes = [
        (lambda a, b: a @ b, (x, w_enc)),  # pre-activations
        (lambda a, b: a @ b, (f, w_dec)),  # reconstruction
        (lambda a, b: a @ b.T, (x, w_dec)),  # gradient to the latents
        (lambda a, b: a.T @ b, (f, x)),  # decoder gradient
        (lambda a, b: batch_major(a) @ b, (x, f)),  # encoder gradient, as the step contracts it
    ]
    total = 0.0
    for fn, operands in shapes:
        compiled = jax.jit(fn)
        total += best_seconds(lambda compiled=compiled, operands=operands: compiled(*operands), repeats)
    return total


def streaming_bytes_per_s(d_in: int, width: int, repeats: int) -> float:
    """Bandwidth of an in-place update reading three and writing two [width, d_in] arrays."""
    keys = jax.random.split(jax.random.key(5), 3)
    param, grad, moment = (jax.random.normal(k, (width, d_in), jnp.float32) for k in keys)
    update = jax.jit(lambda p, g, n: (p - 1e-3 * g * n, 0.999 * n + 1e-3 * g * g), donate_argnums=(0, 2))
    holder = {"state": (param, moment)}

    def one_update():
        holder["state"] = update(holder["state"][0], grad, holder["state"][1])
        return holder["state"]

    return 5 * param.nbytes / best_seconds(one_update, repeats)


def measure_sparse(args: argparse.Namespace) -> dict:
    """Dense and sparse steps at the same activity (JumpReLU, or target-L0 JumpReLU with
    --target-l0, at --l0-fraction, an SAE or with --d-out a transcoder; or TopK, BatchTopK
    and Matryoshka BatchTopK with --topk, --batchtopk and --matryoshka latents per row),
    alternating, best of each."""
    dense, sparse, measured = [], [], {}
    kept = {"topk": args.topk, "batchtopk": args.batchtopk, "matryoshka_batchtopk": args.matryoshka}
    architecture = next((name for name, k in kept.items() if k is not None), None)
    if architecture is not None:
        kind = {"architecture": architecture, "knob": float(kept[architecture])}
    else:
        architecture = JUMPRELU if args.target_l0 is None else "jumprelu_target_l0"
        kind = {"architecture": architecture, "knob": args.target_l0 or 1e-3, "l0_fraction": args.l0_fraction,
                "d_out": args.d_out}
    for _ in range(args.rounds):
        dense.append(step_seconds(args.d_in, args.width, args.batch, args.group, args.dtype, args.steps, **kind))
        sparse.append(step_seconds(args.d_in, args.width, args.batch, args.group, args.dtype, args.steps,
                                   use_sparse=True, measured=measured, **kind))
    return {
        "d_in": args.d_in, "d_out": args.d_out, "width": args.width, "batch": args.batch, "group": args.group,
        "architecture": architecture,
        "devices": [str(d) for d in jax.devices()][:1],
        "l0": measured["l0"], "l0_fraction": measured["l0"] / args.width,
        "sparse_path_ran": measured["sparse_step"],  # false: a row's pairs did not fit, the "sparse" step was dense
        "dense_step_seconds": min(dense), "sparse_step_seconds": min(sparse),
        "dense_tokens_per_s": args.batch / min(dense), "sparse_tokens_per_s": args.batch / min(sparse),
        "sparse_speedup": min(dense) / min(sparse),
    }


def measure(args: argparse.Namespace) -> dict:
    topk_style = any(k is not None for k in (args.topk, args.batchtopk, args.matryoshka))
    for flag, value in (("--d-out", args.d_out), ("--target-l0", args.target_l0)):
        if value is not None and (args.l0_fraction is None or topk_style):
            raise UserError(f"bench train-step: {flag} times a JumpReLU step's sparse path: give --l0-fraction "
                            "(and no --topk, --batchtopk or --matryoshka)")
    if args.l0_fraction is not None or topk_style:
        return measure_sparse(args)
    flops = 10.0 * args.batch * args.d_in * args.width * args.group
    repeats = max(args.steps, 5)
    timings = {"step": [], "matmul": [], "own": [], "streaming": [], "single": []}
    for _ in range(args.rounds):
        timings["step"].append(step_seconds(args.d_in, args.width, args.batch, args.group, args.dtype, args.steps,
                                            args.matmul_dtype))
        timings["matmul"].append(matmul_flops_per_s(args.d_in, args.width, args.batch, repeats, args.matmul_dtype))
        timings["own"].append(step_matmul_seconds(args.d_in, args.width, args.batch, repeats, args.matmul_dtype))
        timings["streaming"].append(streaming_bytes_per_s(args.d_in, args.width, repeats))
        if args.group > 1:
            timings["single"].append(step_seconds(args.d_in, args.width, args.batch, 1, args.dtype, args.steps,
                                                  args.matmul_dtype))
    seconds, matmul = min(timings["step"]), max(timings["matmul"])
    peak = args.peak_flops or known_peak()
    result = {
        "d_in": args.d_in, "width": args.width, "batch": args.batch, "group": args.group, "dtype": args.dtype,
        "matmul_dtype": args.matmul_dtype,
        "devices": [str(d) for d in jax.devices()][:1] + ([f"... {len(jax.devices())} total"] if len(jax.devices()) > 1 else []),
        "step_seconds": seconds,
        "steps_per_s": 1.0 / seconds,
        "tokens_per_s": args.batch / seconds,
        "flops_per_s": flops / seconds,
        "matmul_flops_per_s": matmul,
        "fraction_of_matmul": flops / seconds / matmul,
        "peak_flops": peak,
        # Parameters, Adam second moments and gradients of the group, float32.
        "state_bytes": 3 * 4 * (2 * args.d_in * args.width + 3 * args.width + args.d_in) * args.group,
        "mfu": None if peak is None else flops / seconds / peak,
    }
    own_matmuls = min(timings["own"]) * args.group
    optimiser_seconds = 20.0 * 2 * args.d_in * args.width * args.group / max(timings["streaming"])
    ideal = flops / matmul
    result.update({
        "own_matmuls_seconds": own_matmuls,
        "fraction_of_own_matmuls": own_matmuls / seconds,
        "optimiser_memory_floor_seconds": optimiser_seconds,
        "ceiling_fraction_of_matmul": ideal / (own_matmuls + optimiser_seconds),
    })
    if args.group > 1:
        single = min(timings["single"])
        result["single_step_seconds"] = single
        result["group_cost_vs_singles"] = seconds / (args.group * single)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def run(args: argparse.Namespace) -> None:
    from gemmascope.bench import report

    report(measure(args), args.json)
