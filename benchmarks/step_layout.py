"""The training step's layout choices, each against the plain form, side by side in one run.

    python benchmarks/step_layout.py --d-in 2304 --width 16384 --batch 1024
    python benchmarks/step_layout.py --d-in 2304 --width 65536 --batch 1024 --only batch_sum

- `batch_major`: the JumpReLU step's encoder gradient from a stored [d_in, batch] copy
  of the rows, against the transpose XLA folds into the matmul;
- `input_matmul`: the same for the autodiff path of the other architectures (ReLU + L1
  here) and of their transcoders (a target-L0 JumpReLU transcoder);
- `batch_sum`: every per-latent sum over the batch (the bias and threshold gradients)
  as a matrix-vector product, against XLA's reduction over the leading dimension, in
  the JumpReLU step and on the autodiff path (ReLU + L1);
- `after_every_read`: gradients ordered after every parameter read, against none: step
  time, and the compiled step's temporary buffers (XLA's memory analysis), where the
  copies of W_enc and W_dec show.

Each variant is compiled once and the pair is timed alternately over `--rounds`, best of
each; prints one JSON object.
"""

import argparse
import json

import jax

import gemmascope.train.arch.wiring as wiring
import gemmascope.train.group as group_module
import gemmascope.train.jumprelu as jumprelu
from gemmascope.bench.train_step import best_seconds
from gemmascope.config import TrainConfig
from gemmascope.huge_pages import reexec_with_huge_pages
from gemmascope.train.group import Group, init_state, make_train_step


def compiled_step(group: Group, config: TrainConfig, x):
    step = jax.jit(make_train_step(group, config, 1.0), donate_argnums=0)
    compiled = step.lower(init_state(group, config, jax.random.key(0)), x).compile()
    holder = {"state": init_state(group, config, jax.random.key(0))}

    def one_step():
        holder["state"], _ = compiled(holder["state"], x)
        return holder["state"].step

    return one_step, compiled.memory_analysis().temp_size_in_bytes


def compare(name: str, group: Group, config: TrainConfig, x, patches: dict, steps: int, rounds: int) -> dict:
    """Best seconds per step and temporary bytes with the layout (`ours`) and with `patches` applied."""
    variants = {}
    for variant in ("ours", "plain"):
        saved = {(module, attr): getattr(module, attr) for module, attr in patches}
        if variant == "plain":
            for (module, attr), value in patches.items():
                setattr(module, attr, value)
        try:
            variants[variant] = compiled_step(group, config, x)
        finally:
            for (module, attr), value in saved.items():
                setattr(module, attr, value)
    times = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant, (one_step, _) in variants.items():
            times[variant].append(best_seconds(one_step, steps))
    ours, plain = min(times["ours"]), min(times["plain"])
    return {"what": name, "ours_step_seconds": ours, "plain_step_seconds": plain, "speedup": plain / ours,
            "ours_temp_bytes": variants["ours"][1], "plain_temp_bytes": variants["plain"][1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", choices=["batch_major", "input_matmul", "batch_sum",
                                                            "after_every_read"],
                        help="time only this choice (repeatable; default: all)")
    args = parser.parse_args()
    config = TrainConfig(tokens=args.batch * 10**6, batch_size=args.batch, shuffle_rows=args.batch,
                         sparsity_warmup_steps=1)
    key_x, key_y = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (args.batch, args.d_in))
    pair = jax.numpy.concatenate([x, jax.random.normal(key_y, (args.batch, args.d_in))], axis=1)
    sae = Group.of(args.d_in, [(args.width, 1e-3)])
    folded = lambda rows: rows.T  # noqa: E731 - the transpose XLA folds into the dot
    plain_matmul = lambda rows, weights: rows @ weights  # noqa: E731
    plain_sum = lambda rows: jax.numpy.sum(rows.reshape(-1, rows.shape[-1]), axis=0, dtype=jax.numpy.float32)  # noqa: E731
    relu_l1 = Group.of(args.d_in, [(args.width, 1e-3)], ["relu_l1"])
    # JumpReLU transcoders take the fused step; Gemma Scope 2's target-L0 ones differentiate the rule.
    transcoder = Group.of(args.d_in, [(args.width, 45)], ["jumprelu_target_l0"], d_out=args.d_in)
    choices = [
        ("batch_major (JumpReLU SAE)", sae, x, {(jumprelu, "batch_major"): folded}),
        ("input_matmul (ReLU + L1 SAE)", relu_l1, x, {(jumprelu, "input_matmul"): plain_matmul}),
        ("input_matmul (target-L0 transcoder)", transcoder, pair,
         {(jumprelu, "input_matmul"): plain_matmul, (wiring, "input_matmul"): plain_matmul}),
        ("batch_sum (JumpReLU SAE)", sae, x, {(jumprelu, "batch_sum"): plain_sum}),
        ("batch_sum (ReLU + L1 SAE)", relu_l1, x, {(jumprelu, "batch_sum"): plain_sum}),
        ("after_every_read (JumpReLU SAE)", sae, x, {(group_module, "after_every_read"): lambda grads: grads}),
    ]
    results = [compare(name, group, config, rows, patches, args.steps, args.rounds)
               for name, group, rows, patches in choices
               if not args.only or name.split(" (")[0] in args.only]
    print(json.dumps({"d_in": args.d_in, "width": args.width, "batch": args.batch,
                      "device": str(jax.devices()[0]), "comparisons": results}))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as the command line runs a step
    main()
