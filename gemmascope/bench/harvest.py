"""`gemmascope bench harvest`: capture + storage against the bare forward, same tokens, same run.

Both sides run the same packed sequences through the same model in this process; the
harvest side is the real worker code writing a real store to local disk. `--backend`
picks the forward whose figures are the headline (`tokens_per_s`,
`bare_forward_tokens_per_s`); unless `--no-compare`, the other backend runs too, on the
same token batches into the same store (each harvest rewrites unit 0 with the same rows),
and `backends` holds both sets of figures side by side.

Each backend runs once untimed first (JAX compiles its programs then; torch warms its
allocator and kernels), and that first call is reported as `first_call_seconds`. Timed
repetitions then alternate (bare and harvest of one backend, then the other's, then
again ...) so drift on a noisy machine hits every side, and the best repetition of each
is reported.

Where the overhead goes: each repetition also runs the store-only harvest, the worker
with the headline backend's recorded rows replayed instead of a forward (everything a
harvest does but the model: gathers, checksums, TensorStore's encoding, the kernel's
file writes). Every side reports its CPU seconds too (all of this process's threads), so
harvest CPU - bare CPU can be set against the store-only CPU: on a machine whose forward
keeps every core busy, what the writes cost in CPU the harvest pays in time.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gemmascope.bench import positive_int

BACKENDS = ("torch", "jax")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("harvest", help="harvest tokens/s against the bare forward pass")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="the forward whose figures are tokens_per_s and bare_forward_tokens_per_s")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="do not also measure the other backend on the same tokens")
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


def device_info(backend: Any) -> dict:
    """Where a backend runs: torch's device, dtype and CPU threads; JAX's platform and device kind."""
    if hasattr(backend, "loaded"):  # TorchForward
        import torch

        loaded = backend.loaded
        info = {"device": loaded.device.type, "dtype": str(loaded.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads()}
        if loaded.device.type == "cuda":
            info["device_kind"] = torch.cuda.get_device_name(loaded.device)
        return info
    device = backend.devices[0]
    return {"device": device.platform, "device_kind": device.device_kind, "devices": len(backend.devices),
            "dtype": np.dtype(backend.dtype).name, "data_parallel": backend.data_parallel}


def computed_positions(backend: Any, batches: list[np.ndarray]) -> int:
    """Positions the forward actually runs: JAX pads a batch to a power of two rows per
    device (`JaxForward.padded_rows`), so a short last batch costs more than its rows."""
    if not hasattr(backend, "padded_rows"):
        return sum(b.size for b in batches)
    return sum(backend.padded_rows(len(b)) * b.shape[1] for b in batches)


def _timed(run: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of every thread of this process, result) of `run(*args)`."""
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    began, began_cpu = time.perf_counter(), cpu()
    result = run(*args)
    return time.perf_counter() - began, cpu() - began_cpu, result


def _bare_pass(backend: Any, batches: list[np.ndarray]) -> None:
    for batch in batches:
        backend.bare_forward(batch)


class _Recording:
    """A backend that runs `backend` and keeps what each `collect` handed the worker."""

    def __init__(self, backend: Any):
        self.backend, self.collected = backend, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def collect(self, pending: Any) -> Any:
        kept = self.backend.collect(pending)
        self.collected.append(kept)
        return kept


class _Replay:
    """A backend that hands back recorded batches instead of running a model: the worker
    on it does everything a harvest does but the forward."""

    def __init__(self, backend: Any, collected: list):
        self.info, self.tokenizer, self.collected = backend.info, backend.tokenizer, collected
        self.next = 0

    def launch(self, input_ids: np.ndarray, keys: tuple, flat_rows: np.ndarray, store_dtype: str) -> Any:
        batch = self.collected[self.next % len(self.collected)]
        self.next += 1
        return batch

    def collect(self, pending: Any) -> Any:
        return pending


def _stored(worker: Any, key: tuple[str, int], n_rows: int) -> np.ndarray:
    """Rows [0, n_rows) of one array of the store, as float32."""
    from gemmascope.store import paths
    from gemmascope.store.arrays import open_array

    array = open_array(paths.array_url(worker.activations, *key))
    return np.asarray(array[:n_rows].read().result()).astype(np.float32)


def measure(args: argparse.Namespace) -> dict:
    # Imported here so that `gemmascope bench train-step` runs where torch and Ray are not installed.
    from gemmascope.config import Config, HarvestConfig, ModelConfig, SourceConfig
    from gemmascope.harvest.driver import array_specs, create_arrays
    from gemmascope.harvest.sources import list_shards
    from gemmascope.harvest.worker import HarvestWorker
    from gemmascope.store import paths
    from gemmascope.store.layout import Layout

    names = [args.backend] + ([b for b in BACKENDS if b != args.backend] if args.compare else [])
    with tempfile.TemporaryDirectory(prefix="bench-harvest-", dir=args.out) as run_dir:
        shard_rows = 2048
        unit_rows = -(-args.tokens // shard_rows) * shard_rows
        config = Config(
            run_dir=run_dir,
            model=ModelConfig(source=args.model, backend=args.backend),
            source=SourceConfig(builtin="pydoc", pieces_per_shard=4),
            harvest=HarvestConfig(sites=tuple(args.sites.split(",")), layers="all",
                                  context_length=args.context_length, batch_size=args.batch_size,
                                  max_tokens=args.tokens, store_dtype=args.store_dtype,
                                  unit_rows=unit_rows, shard_rows=shard_rows, chunk_rows=512),
        )
        activations = paths.activations_url(run_dir)
        workers = {args.backend: HarvestWorker(config, activations)}
        worker = workers[args.backend]
        info = worker.backend.info
        stats = []
        for shard in list_shards(config.source):
            stats.append(worker.tokenize_shard(shard))
            if sum(s.n_rows for s in stats) >= args.tokens:
                break
        layout = Layout.plan(stats, args.tokens, unit_rows)
        create_arrays(config, activations, array_specs(config, info), layout.n_rows)
        sequences = [s[1] for s in worker.unit_sequences(layout, 0, layout.n_rows)]
        batches = [np.stack(sequences[i:i + args.batch_size]).astype(np.int64)
                   for i in range(0, len(sequences), args.batch_size)]
        positions = sum(b.size for b in batches)
        for name in names[1:]:
            other = dataclasses.replace(config, model=dataclasses.replace(config.model, backend=name))
            workers[name] = HarvestWorker(other, activations)
            if workers[name].keys != worker.keys:
                raise RuntimeError(f"backends disagree on the arrays: {workers[name].keys} vs {worker.keys}")

        # First calls, untimed in the repetitions: JAX compiles the bare and the capture
        # programs here; the timed harvests reuse them (the unit's last batch included).
        # The headline backend's first harvest records its rows for the store-only runs.
        first_call: dict[str, dict[str, float]] = {}
        for name in names:
            began = time.perf_counter()
            for batch in {len(b): b for b in batches}.values():  # every batch size once
                workers[name].backend.bare_forward(batch)
            bare_first = time.perf_counter() - began
            backend = workers[name].backend
            if name == args.backend:
                workers[name].backend = _Recording(backend)
            began = time.perf_counter()
            workers[name].harvest_unit(0, layout)
            first_call[name] = {"bare": bare_first, "harvest": time.perf_counter() - began}
            if name == args.backend:
                store_only = HarvestWorker(config, activations, backend=_Replay(backend, workers[name].backend.collected))
                workers[name].backend = backend

        # The stored values of one array, per backend, from the last repetition: a check
        # that both wrote the same rows of the same activations, not a timed figure.
        probe = next((k for k in reversed(worker.keys) if k[0] == "res"), worker.keys[-1])
        bare_times: dict[str, list[float]] = {name: [] for name in names}
        harvest_times: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, dict[str, list[float]]] = {name: {"bare": [], "harvest": []} for name in names}
        store_only_times: list[float] = []
        store_only_cpu: list[float] = []
        stored_rows: dict[str, int] = {}
        checksums: dict[str, dict[str, int]] = {}
        probes: dict[str, np.ndarray] = {}
        for repeat in range(args.repeats):
            for name in names:
                wall, cpu_seconds, _ = _timed(_bare_pass, workers[name].backend, batches)
                bare_times[name].append(wall)
                cpu[name]["bare"].append(cpu_seconds)
                wall, cpu_seconds, unit = _timed(workers[name].harvest_unit, 0, layout)
                harvest_times[name].append(wall)
                cpu[name]["harvest"].append(cpu_seconds)
                stored_rows[name], checksums[name] = unit.rows, unit.checksums
                if repeat == args.repeats - 1 and len(names) > 1:
                    probes[name] = _stored(workers[name], probe, layout.n_rows)
            wall, cpu_seconds, replayed = _timed(store_only.harvest_unit, 0, layout)
            if replayed.checksums != checksums[args.backend]:
                raise RuntimeError("the store-only run wrote other rows than the harvest it replays")
            store_only_times.append(wall)
            store_only_cpu.append(cpu_seconds)

        figures = {}
        for name in names:
            bare, harvest = min(bare_times[name]), min(harvest_times[name])
            figures[name] = {
                "tokens_per_s": positions / harvest,
                "bare_forward_tokens_per_s": positions / bare,
                "overhead": harvest / bare - 1.0,
                "stored_rows": stored_rows[name],
                "computed_positions": computed_positions(workers[name].backend, batches),
                "bare_seconds": bare_times[name],
                "harvest_seconds": harvest_times[name],
                "bare_cpu_seconds": cpu[name]["bare"],
                "harvest_cpu_seconds": cpu[name]["harvest"],
                "first_call_seconds": first_call[name],
                **device_info(workers[name].backend),
            }
        main = figures[args.backend]
        bare, harvest = min(bare_times[args.backend]), min(harvest_times[args.backend])
        result = {
            "model": args.model,
            "backend": args.backend,
            "sites": args.sites.split(","),
            "layers": info.n_layers,
            "arrays": len(worker.keys),
            "context_length": args.context_length,
            "batch_size": args.batch_size,
            "positions": positions,
            "rows": layout.n_rows,
            "tokens_per_s": main["tokens_per_s"],
            "bare_forward_tokens_per_s": main["bare_forward_tokens_per_s"],
            "stored_rows_per_s": layout.n_rows / harvest,
            "overhead": main["overhead"],
            "store_bytes_per_s": layout.n_rows * sum(
                info.site_width(site) for site, _ in worker.keys
            ) * (2 if args.store_dtype == "bfloat16" else 4) / harvest,
            "bare_seconds": bare_times[args.backend],
            "harvest_seconds": harvest_times[args.backend],
            "bare_cpu_seconds": cpu[args.backend]["bare"],
            "harvest_cpu_seconds": cpu[args.backend]["harvest"],
            "store_only_seconds": store_only_times,
            "store_only_cpu_seconds": store_only_cpu,
            "first_call_seconds": first_call[args.backend],
            "device": main["device"],
            "backends": figures,
        }
        if len(names) > 1:
            torch_, jax_ = figures["torch"], figures["jax"]
            result["jax_over_torch_harvest"] = jax_["tokens_per_s"] / torch_["tokens_per_s"]
            result["jax_over_torch_bare"] = jax_["bare_forward_tokens_per_s"] / torch_["bare_forward_tokens_per_s"]
            reference = probes["torch"]
            result["backends_agree"] = {
                "array": paths.array_key(*probe),
                "max_abs_diff_over_max_abs": float(np.abs(probes["jax"] - reference).max()
                                                   / max(float(np.abs(reference).max()), 1e-30)),
            }
        print(f"bench harvest: {positions} positions, {layout.n_rows} rows x {len(worker.keys)} arrays; "
              + "; ".join(f"{name} on {f['device']}: {f['tokens_per_s']:,.0f} tok/s harvest, "
                          f"{f['bare_forward_tokens_per_s']:,.0f} bare" for name, f in figures.items()),
              file=sys.stderr)
        return result
