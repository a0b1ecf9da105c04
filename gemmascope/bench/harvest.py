"""`gemmascope bench harvest`: capture + storage against the bare forward, same tokens, same run.

Both sides run the same packed sequences through the same model in this process; the
harvest side is the real worker code writing a real store to local disk. Repetitions
alternate (bare, harvest, bare, harvest, ...) so drift on a noisy machine hits both,
and the best repetition of each is reported.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from gemmascope.bench import positive_int


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("harvest", help="harvest tokens/s against the bare forward pass")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--sites", default="res,mlp,att")
    parser.add_argument("--tokens", type=positive_int, default=16384, help="stored rows per array")
    parser.add_argument("--context-length", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--store-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--out", default=None, help="store directory (default: a temp dir on local disk)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from gemmascope.bench import report

    report(measure(args), args.json)


def measure(args: argparse.Namespace) -> dict:
    # Imported here so that `gemmascope bench train-step` runs where torch and Ray are not installed.
    import torch

    from gemmascope.config import Config, HarvestConfig, ModelConfig, SourceConfig
    from gemmascope.harvest.driver import array_specs, create_arrays
    from gemmascope.harvest.sources import list_shards
    from gemmascope.harvest.worker import HarvestWorker
    from gemmascope.models.capture import bare_forward
    from gemmascope.store import paths
    from gemmascope.store.layout import Layout

    with tempfile.TemporaryDirectory(prefix="bench-harvest-", dir=args.out) as run_dir:
        shard_rows = 2048
        unit_rows = -(-args.tokens // shard_rows) * shard_rows
        config = Config(
            run_dir=run_dir,
            model=ModelConfig(source=args.model),
            source=SourceConfig(builtin="pydoc", pieces_per_shard=4),
            harvest=HarvestConfig(sites=tuple(args.sites.split(",")), layers="all",
                                  context_length=args.context_length, batch_size=args.batch_size,
                                  max_tokens=args.tokens, store_dtype=args.store_dtype,
                                  unit_rows=unit_rows, shard_rows=shard_rows, chunk_rows=512),
        )
        activations = paths.activations_url(run_dir)
        worker = HarvestWorker(config, activations)
        info = worker.loaded.info
        stats = []
        for shard in list_shards(config.source):
            stats.append(worker.tokenize_shard(shard))
            if sum(s.n_rows for s in stats) >= args.tokens:
                break
        layout = Layout.plan(stats, args.tokens, unit_rows)
        create_arrays(config, activations, array_specs(config, info), layout.n_rows)
        sequences = [s[1] for s in worker.unit_sequences(layout, 0, layout.n_rows)]
        batches = [torch.from_numpy(np.stack(sequences[i:i + args.batch_size]).astype(np.int64))
                   for i in range(0, len(sequences), args.batch_size)]
        positions = sum(b.numel() for b in batches)

        bare_forward(worker.loaded, batches[0])  # warm-up (allocator, kernels)
        bare_times, harvest_times = [], []
        for _ in range(args.repeats):
            began = time.perf_counter()
            for batch in batches:
                bare_forward(worker.loaded, batch)
            bare_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            worker.harvest_unit(0, layout)
            harvest_times.append(time.perf_counter() - began)
        bare, harvest = min(bare_times), min(harvest_times)
        print(f"bench harvest: {positions} positions, {layout.n_rows} rows x "
              f"{len(worker.keys)} arrays, threads={torch.get_num_threads()}", file=sys.stderr)
        return {
            "model": args.model,
            "sites": args.sites.split(","),
            "layers": info.n_layers,
            "arrays": len(worker.keys),
            "context_length": args.context_length,
            "batch_size": args.batch_size,
            "positions": positions,
            "rows": layout.n_rows,
            "tokens_per_s": positions / harvest,
            "bare_forward_tokens_per_s": positions / bare,
            "stored_rows_per_s": layout.n_rows / harvest,
            "overhead": harvest / bare - 1.0,
            "store_bytes_per_s": layout.n_rows * sum(
                info.site_width(site) for site, _ in worker.keys
            ) * (2 if args.store_dtype == "bfloat16" else 4) / harvest,
            "bare_seconds": bare_times,
            "harvest_seconds": harvest_times,
        }
