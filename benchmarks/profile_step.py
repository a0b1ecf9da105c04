"""Where a training step's time goes: the whole step, the loss and its gradients alone,
and the parameter update alone, each jitted and timed on its own (GPU or CPU).

    python benchmarks/profile_step.py --width 131072 --matmul-dtype bfloat16
"""

import argparse
import json

import jax
import jax.numpy as jnp

from gemmascope.bench.train_step import best_seconds, step_seconds
from gemmascope.config import TrainConfig
from gemmascope.huge_pages import reexec_with_huge_pages
from gemmascope.train.group import Group, apply_gradients, build_optimizer, init_state
from gemmascope.train.jumprelu import fused_loss_fn

reexec_with_huge_pages()  # as the command line runs a step
parser = argparse.ArgumentParser()
parser.add_argument("--d-in", type=int, default=2304)
parser.add_argument("--width", type=int, default=131072)
parser.add_argument("--batch", type=int, default=4096)
parser.add_argument("--matmul-dtype", default="bfloat16")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

config = TrainConfig(tokens=args.batch * 10**6, batch_size=args.batch, shuffle_rows=args.batch,
                     sparsity_warmup_steps=1, matmul_dtype=args.matmul_dtype)
group = Group.of(args.d_in, [(args.width, 1e-3)])
state = init_state(group, config, jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (args.batch, args.d_in), jnp.float32)
params = state.params[0]

grad = jax.jit(jax.grad(lambda p: fused_loss_fn(p, x, 1e-3, config.bandwidth, config.matmul_dtype)[0]))
grads = grad(params)
optimizer = build_optimizer(config)


update = jax.jit(lambda params, opt_state, grads: apply_gradients(optimizer, params, opt_state, grads))
result = {
    "width": args.width, "matmul_dtype": args.matmul_dtype,
    "step_s": step_seconds(args.d_in, args.width, args.batch, 1, "float32", args.steps, args.matmul_dtype),
    "loss_and_grads_s": best_seconds(lambda: grad(params), args.steps),
    "update_s": best_seconds(lambda: update(state.params, state.opt_state, (grads,)), args.steps),
}
print(json.dumps(result))
