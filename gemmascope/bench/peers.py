"""`gemmascope bench peers`: our training step against the PyTorch SAE trainers, side by side.

The peers run in their own environment (torch, sae-lens, eai-sparsify: `make
bench-peers` builds `.venv-peers` and passes its Python as --python), each as a
`peer_worker.py` process that builds its SAE once and times steps on request. Each
comparison builds our compiled step and its peers at the same shape, float32, on the
same random batch size, then alternates them over --rounds, keeping each one's best
step, so a slow spell of a shared machine biases no ratio. Our steps run as the trainer
runs them on this machine (`use_sparse` where `sparse.sparse_available`, on huge pages:
`gemmascope.huge_pages`). Each peer runs twice, with glibc's default malloc and on huge
pages (which speed torch up at large shapes and slow it down at small ones), and its
better figure counts:

- JumpReLU at initialisation (every latent near its threshold: our dense path) and at
  L0 = --l0-fraction of the width (thresholds at each latent's quantile, on both sides:
  our sparse path), against SAELens' JumpReLU SAE;
- TopK with --k latents per row, against SAELens' and sparsify's TopK SAEs;
- BatchTopK keeping --k latents per row on average, against SAELens' BatchTopK SAE;
- Matryoshka BatchTopK, the same with 4 nested prefixes, against SAELens' Matryoshka
  BatchTopK SAE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax

from gemmascope import huge_pages
from gemmascope.bench import add_sae_shape, fraction, positive_int
from gemmascope.bench.train_step import best_seconds, compiled_step

WORKER = Path(__file__).with_name("peer_worker.py")
# A pause before each timing: the thread pools of the process that ran last (XLA's,
# numba's, torch's OpenMP) spin a while before they sleep, and would share the cores.
SETTLE_SECONDS = 1.0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("peers", help="our training step against SAELens and sparsify on this machine")
    add_sae_shape(parser)
    parser.add_argument("--python", required=True,
                        help="Python of an environment with torch, sae-lens and eai-sparsify (`make bench-peers`)")
    parser.add_argument("--k", type=positive_int, default=32, help="latents per row of the TopK SAEs")
    parser.add_argument("--l0-fraction", type=fraction, default=0.01,
                        help="activity of the trained JumpReLU comparison (L0 / width)")
    parser.add_argument("--steps", type=positive_int, default=2, help="steps per round (best of them counts)")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def malloc_environments() -> dict[str, dict[str, str]]:
    """The environments each peer runs in: glibc's default malloc, and huge pages where
    this process may use them (not with GEMMASCOPE_HUGE_PAGES=0, nor off glibc)."""
    plain = huge_pages.without_huge_pages(os.environ)
    tunables = huge_pages.glibc_tunables(plain)
    return {"default": plain, **({"huge pages": {**plain, "GLIBC_TUNABLES": tunables}} if tunables else {})}


class PeerError(RuntimeError):
    """A peer trainer could not start or step."""


class Peer:
    """A `peer_worker.py` process: started (SAE built, one warm-up step) on creation."""

    def __init__(self, python: str, trainer: str, args: list[str], malloc: str, env: dict[str, str]):
        self.trainer, self.malloc = trainer, malloc
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - the worker's stderr, closed by close()
        try:
            self._process = subprocess.Popen([python, str(WORKER), trainer, *args], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        except OSError as err:
            self._log.close()
            raise PeerError(f"peers' Python {python!r} cannot run: {err.strerror} (make bench-peers builds one)") from err
        self.ready = self._reply("ready")

    def _reply(self, key: str) -> dict:
        """The next JSON line with `key` (libraries may print other lines first)."""
        for line in self._process.stdout:
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(reply, dict) and key in reply:
                return reply
        self._process.wait()
        self._log.seek(0)
        last = [line for line in self._log.read().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise PeerError(f"peer {self.trainer} exited with status {self._process.returncode}: {last[0]}")

    def seconds(self, steps: int) -> float:
        """Best seconds of `steps` steps."""
        self._process.stdin.write(f"{steps}\n")
        self._process.stdin.flush()
        return self._reply("seconds")["seconds"]

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()
        self._log.close()


@dataclass(frozen=True)
class Comparison:
    ours: str  # what our side is, in words
    architecture: str  # our architecture name
    knob: float  # its sparsity knob (lambda, or k)
    l0_fraction: float | None  # JumpReLU thresholds set for this activity, on both sides
    peers: tuple[str, ...]  # peer_worker trainers


def comparisons(args: argparse.Namespace) -> list[Comparison]:
    return [
        Comparison("JumpReLU at initialisation", "jumprelu", 1e-3, None, ("saelens-jumprelu",)),
        Comparison(f"JumpReLU at L0 {args.l0_fraction:.0%} of width", "jumprelu", 1e-3, args.l0_fraction,
                   ("saelens-jumprelu",)),
        Comparison(f"TopK, k {args.k}", "topk", float(args.k), None, ("saelens-topk", "sparsify-topk")),
        Comparison(f"BatchTopK, k {args.k}", "batchtopk", float(args.k), None, ("saelens-batchtopk",)),
        Comparison(f"Matryoshka BatchTopK, k {args.k}", "matryoshka_batchtopk", float(args.k), None,
                   ("saelens-matryoshka",)),
    ]


def compare(args: argparse.Namespace, comparison: Comparison) -> list[dict]:
    shape = ["--d-in", str(args.d_in), "--width", str(args.width), "--batch", str(args.batch), "--k", str(args.k)]
    if comparison.l0_fraction is not None:
        shape += ["--l0-fraction", str(comparison.l0_fraction)]
    one_step, holder = compiled_step(args.d_in, args.width, args.batch, 1, "float32",
                                     l0_fraction=comparison.l0_fraction, use_sparse=True,
                                     architecture=comparison.architecture, knob=comparison.knob)
    peers = []
    try:
        for trainer in comparison.peers:
            for malloc, env in malloc_environments().items():
                peers.append(Peer(args.python, trainer, shape, malloc, env))
        ours, theirs = [], {(peer.trainer, peer.malloc): [] for peer in peers}
        for _ in range(args.rounds):
            time.sleep(SETTLE_SECONDS)
            ours.append(best_seconds(one_step, args.steps))
            for peer in peers:
                time.sleep(SETTLE_SECONDS)
                theirs[peer.trainer, peer.malloc].append(peer.seconds(args.steps))
    finally:
        for peer in peers:
            peer.close()
    metrics = holder["metrics"]
    rows = []
    for trainer in comparison.peers:
        ready = next(peer.ready for peer in peers if peer.trainer == trainer)
        by_malloc = {malloc: min(times) for (name, malloc), times in theirs.items() if name == trainer}
        seconds = min(by_malloc.values())
        rows.append({
            "ours": comparison.ours, "peer": trainer, "peer_library": ready["library"],
            "torch": ready["torch"], "torch_threads": ready["threads"],
            "ours_l0": float(metrics["l0"][0]), "ours_sparse_step": bool(metrics["sparse_step"][0]),
            "ours_step_seconds": min(ours), "peer_step_seconds": seconds,
            "peer_step_seconds_by_malloc": by_malloc,
            "ours_tokens_per_s": args.batch / min(ours), "peer_tokens_per_s": args.batch / seconds,
            "speedup": seconds / min(ours),
        })
    return rows


def measure(args: argparse.Namespace) -> dict:
    rows = [row for comparison in comparisons(args) for row in compare(args, comparison)]
    return {"d_in": args.d_in, "width": args.width, "batch": args.batch, "dtype": "float32",
            "devices": [str(d) for d in jax.devices()][:1], "peers": rows}


def run(args: argparse.Namespace) -> None:
    from gemmascope.bench import report

    report(measure(args), args.json)
