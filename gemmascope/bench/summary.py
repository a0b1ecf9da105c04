"""`gemmascope bench summary DIR`: the markdown table of the JSON results `make bench` wrote to DIR.

Each row is a ratio or a rate measured side by side in one run of one benchmark, next to
the target it is held to; nothing here is compared across runs or machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("summary", help="markdown table of the JSON results in a directory")
    parser.add_argument("directory", help="where `make bench` wrote its JSON (benchmarks/results)")
    parser.set_defaults(run=run)


def _train_rows(name: str, r: dict) -> list[tuple[str, str, str]]:
    shape = f"({r['d_in']}, {r['width']}, batch {r['batch']}, {r.get('matmul_dtype', 'float32')}) on {r['devices'][0]}"
    rows = [(f"train step {shape}", f"{r['tokens_per_s']:,.0f} tok/s; {r['fraction_of_matmul']:.2f} of matmul FLOP/s "
             f"(ceiling {r['ceiling_fraction_of_matmul']:.2f})", ">= 0.85 of matmul")]
    if r.get("mfu") is not None:
        rows.append((f"train step {shape}", f"MFU {r['mfu']:.3f} of the bf16 peak", ">= 0.50"))
    if r["group"] > 1:
        rows.append((f"group of {r['group']} {shape}", f"{r['group_cost_vs_singles']:.3f} x {r['group']} single steps",
                     "<= 1.05"))
    if "peak_rss_bytes" in r and r["width"] >= 65536:
        rows.append((f"peak RSS, group of {r['group']} {shape}", f"{r['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"(state {r['state_bytes'] / 2**30:.2f} GiB)", "documented"))
    return rows


def _where(f: dict) -> str:
    kind = f.get("device_kind")
    return f"{f['device']} ({kind})" if kind and kind != f["device"] else f["device"]


def _harvest_rows(r: dict) -> list[tuple[str, str, str]]:
    """Each backend's harvest against its own bare forward, then JAX against torch on the same tokens."""
    label = f"harvest {r['model']} {','.join(r['sites'])} x {r['layers']} layers"
    backends = r.get("backends")
    if not backends:  # a result from before the benchmark measured both backends
        return [(label, f"{r['tokens_per_s']:,.0f} tok/s; {1 + r['overhead']:.3f} x bare forward", "<= 1.10")]
    names = [r["backend"]] + [name for name in backends if name != r["backend"]]
    rows = [(f"{label}, {name} on {_where(backends[name])}",
             f"{backends[name]['tokens_per_s']:,.0f} tok/s; {1 + backends[name]['overhead']:.3f} x bare forward",
             "<= 1.10") for name in names]
    if "store_only_seconds" in r:
        main = backends[r["backend"]]
        rows.append((f"{label}, {r['backend']}: where the overhead goes",
                     f"harvest - bare forward {min(r['harvest_seconds']) - min(r['bare_seconds']):.2f} s, "
                     f"{min(main['harvest_cpu_seconds']) - min(main['bare_cpu_seconds']):.2f} CPU-s; "
                     f"the writes alone (rows replayed, no forward) {min(r['store_only_seconds']):.2f} s, "
                     f"{min(r['store_only_cpu_seconds']):.2f} CPU-s", "documented"))
    if "jax_over_torch_harvest" in r:
        jax, torch = backends["jax"], backends["torch"]
        rows.append((f"{label}, jax against torch (same tokens, same run)",
                     f"harvest {jax['tokens_per_s']:,.0f} vs {torch['tokens_per_s']:,.0f} tok/s: "
                     f"{r['jax_over_torch_harvest']:.2f}x; bare forward {jax['bare_forward_tokens_per_s']:,.0f} vs "
                     f"{torch['bare_forward_tokens_per_s']:,.0f} tok/s: {r['jax_over_torch_bare']:.2f}x", "documented"))
    return rows


def _peer_rows(r: dict) -> list[tuple[str, str, str]]:
    """Our step against each PyTorch trainer's, same shape, same run."""
    shape = f"({r['d_in']}, {r['width']}, batch {r['batch']}, {r['dtype']}) on {r['devices'][0]}"
    return [(f"{p['ours']} {shape}: ours against {p['peer']} ({p['peer_library']}, torch {p['torch']})",
             f"{p['ours_tokens_per_s']:,.0f} vs {p['peer_tokens_per_s']:,.0f} tok/s: {p['speedup']:.2f}x",
             "> 1x") for p in r["peers"]]


def summarise(directory: Path) -> str:
    rows: list[tuple[str, str, str]] = []
    for path in sorted(directory.glob("*.json*")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "sparse_speedup" in r:
                kind = {"topk": "TopK ", "batchtopk": "BatchTopK ", "matryoshka_batchtopk": "Matryoshka BatchTopK ",
                        "jumprelu_target_l0": "target-L0 JumpReLU "}.get(r.get("architecture"), "")
                if r.get("d_out") is not None:
                    kind = f"{kind or 'JumpReLU '}transcoder (to {r['d_out']}) "
                rows.append((f"sparse {kind}step ({r['d_in']}, {r['width']}, batch {r['batch']}) at L0 {r['l0']:.0f} "
                             f"({r['l0_fraction']:.1%} of width)",
                             f"{r['sparse_tokens_per_s']:,.0f} vs {r['dense_tokens_per_s']:,.0f} tok/s dense: "
                             f"{r['sparse_speedup']:.2f}x", "documented" if kind else ">= 2x"))
            elif "fraction_of_matmul" in r:
                rows.extend(_train_rows(path.stem, r))
            elif "store_over_memory" in r:
                rows.append((f"loader ({r['d_in']}, {r['width']}, batch {r['batch']}, {r['store_dtype']} store)",
                             f"{r['store_over_memory']:.3f} x in-memory step time; serves "
                             f"{r['loader_rows_per_s']:,.0f} rows/s", "<= 1.05"))
                rows.append(("loader memory", f"RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB peak, "
                             f"{r['rss_growth_bytes_per_step_after_warmup'] / 2**10:+.1f} KiB/step after warm-up",
                             "flat"))
            elif "bare_forward_tokens_per_s" in r:
                rows.extend(_harvest_rows(r))
            elif "peers" in r:
                rows.extend(_peer_rows(r))
            elif "comparisons" in r:
                shape = f"({r['d_in']}, {r['width']}, batch {r['batch']}) on {r['device']}"
                rows.extend((f"step layout: {c['what']} {shape}",
                             f"{c['speedup']:.2f}x the plain form's step; temporaries "
                             f"{c['ours_temp_bytes'] / 2**20:,.0f} vs {c['plain_temp_bytes'] / 2**20:,.0f} MiB",
                             "documented") for c in r["comparisons"])
    lines = ["| benchmark | measured (one run, side by side) | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    print(summarise(Path(args.directory)), end="")
