"""`gemmascope bench loader`: does reading the store slow training down, and does memory stay flat?

The same jitted training step runs, alternately, on batches from the real loader (a
zarr3 store on local disk: shuffled blocks, shuffle buckets, a prefetch thread) and on
batches already on the device; the ratio of the two is the loader's cost to training.
The loader alone is timed too (rows/s it can serve), and the process's resident memory
is sampled along a longer run from the store, so a leak shows as a slope.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import jax
import numpy as np

from gemmascope.bench import add_sae_shape, positive_int
from gemmascope.bench.train_step import best_seconds
from gemmascope.config import TrainConfig
from gemmascope.store import ActivationStore
from gemmascope.store.synthetic import write_store
from gemmascope.train.group import Group, initial_state, make_train_step, sharded_layout
from gemmascope.train.loader import ActivationLoader
from gemmascope.train.mesh import batch_sharding, make_mesh


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("loader", help="training from the store against training from memory; RSS")
    add_sae_shape(parser)
    parser.add_argument("--rows", type=positive_int, default=262_144, help="rows in the synthetic store")
    parser.add_argument("--shuffle-rows", type=positive_int, default=65_536)
    parser.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=positive_int, default=20, help="steps per timed repetition")
    parser.add_argument("--long-steps", type=positive_int, default=400, help="steps of the memory run")
    parser.add_argument("--out", default=None, help="store directory (default: a temp dir on local disk)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=args.out) as run_dir:
        rows = np.random.default_rng(0).standard_normal((args.rows, args.d_in), dtype=np.float32)
        write_store(run_dir, {("res", 0): rows}, dtype=args.store_dtype, unit_rows=args.rows,
                    shard_rows=16_384, chunk_rows=4096)
        del rows
        store = ActivationStore.open(run_dir)
        config = TrainConfig(tokens=args.batch * 10**6, batch_size=args.batch, shuffle_rows=args.shuffle_rows,
                             sparsity_warmup_steps=1)
        group = Group.of(args.d_in, [(args.width, 1e-3)])
        mesh = make_mesh(config)
        _, shardings = sharded_layout(group, config, mesh)
        placement = batch_sharding(mesh)
        step = jax.jit(make_train_step(group, config, scale=1.0), in_shardings=(shardings, placement),
                       out_shardings=(shardings, None), donate_argnums=0)
        holder = {"state": initial_state(group, config, shardings)}

        def loader() -> ActivationLoader:
            return ActivationLoader(store, "res", 0, batch_size=args.batch, shuffle_rows=args.shuffle_rows,
                                    seed=0, stop_row=store.n_rows, prefetch=config.prefetch_batches,
                                    place=lambda r: jax.device_put(r, placement))

        live = loader()
        in_memory = [live.next() for _ in range(args.steps)]

        def from_memory():
            for batch in in_memory:
                holder["state"], _ = step(holder["state"], batch)
            return holder["state"].step

        def from_store():
            for _ in range(args.steps):
                holder["state"], _ = step(holder["state"], live.next())
            return holder["state"].step

        memory_times, store_times = [], []
        for _ in range(3):  # alternate, so drift on a noisy machine hits both
            memory_times.append(best_seconds(from_memory, 1))
            store_times.append(best_seconds(from_store, 1))
        live.close()

        alone = loader()
        began = time.perf_counter()
        served = 0
        while time.perf_counter() - began < 3.0:
            alone.next()
            served += args.batch
        loader_rows_per_s = served / (time.perf_counter() - began)
        alone.close()

        live = loader()
        samples = []
        for index in range(args.long_steps):
            holder["state"], _ = step(holder["state"], live.next())
            if (index + 1) % max(1, args.long_steps // 8) == 0:
                jax.block_until_ready(holder["state"].step)
                samples.append((index + 1, rss_bytes()))
        live.close()
    bucket_bytes = args.shuffle_rows * args.d_in * 4
    after_warmup = samples[len(samples) // 4:]
    steps, rss = np.array([s for s, _ in after_warmup], float), np.array([r for _, r in after_warmup], float)
    slope = float(np.polyfit(steps, rss, 1)[0]) if len(after_warmup) > 1 else 0.0
    return {
        "d_in": args.d_in, "width": args.width, "batch": args.batch, "store_dtype": args.store_dtype,
        "shuffle_rows": args.shuffle_rows,
        "memory_step_seconds": min(memory_times) / args.steps,
        "store_step_seconds": min(store_times) / args.steps,
        "store_over_memory": min(store_times) / min(memory_times),
        "loader_rows_per_s": loader_rows_per_s,
        "training_rows_per_s": args.batch * args.steps / min(store_times),
        "buffer_bound_bytes": 2 * bucket_bytes + config.prefetch_batches * args.batch * args.d_in * 4,
        "rss_samples": samples,
        "rss_growth_bytes_per_step_after_warmup": slope,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run(args: argparse.Namespace) -> None:
    from gemmascope.bench import report

    report(measure(args), args.json)
