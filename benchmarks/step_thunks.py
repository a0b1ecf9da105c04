"""Where one training step's time goes, kernel by kernel: XLA's own trace of the step.

    python benchmarks/step_thunks.py --d-in 2304 --width 65536 --batch 1024
    python benchmarks/step_thunks.py --d-in 2304 --width 16384 --batch 4096 --l0-fraction 0.01 --sparse

Runs the step of `gemmascope bench train-step` (same shapes and options) a few times,
then traces `--steps` more with `jax.profiler` and reads the trace back: every thunk XLA
ran (a fused kernel, a library matmul, a host callback) with its mean milliseconds per
step, and the last step's timeline (start, duration and thread of each thunk), which
shows what ran beside what. Thunks on different threads overlap, so their durations add
up to more than the step when XLA runs two at once; a library call XLA starts
asynchronously (an Eigen matmul) shows only its launch, and its time appears in the
thunks that wait beside it. Prints one JSON object.
"""

import argparse
import glob
import gzip
import json
import tempfile
import time
from collections import defaultdict

import jax

from gemmascope.bench.train_step import compiled_step
from gemmascope.huge_pages import reexec_with_huge_pages


def trace_events(directory: str) -> list[dict]:
    """The complete ('X') events of the Perfetto trace jax.profiler wrote under `directory`."""
    [path] = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as trace:
        return [event for event in json.load(trace)["traceEvents"] if event.get("ph") == "X"]


def profile(one_step, steps: int) -> dict:
    """Per-thunk milliseconds of `one_step` (already compiled and warm) over `steps` traced steps."""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            began = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(one_step())
            wall = (time.perf_counter() - began) / steps
        events = trace_events(directory)
    launches = sorted((e for e in events if e["name"].startswith("PjitFunction")), key=lambda e: e["ts"])
    # XLA's thunk executor names each thunk's HLO op; Python frames and runtime events do not.
    thunks = [{**e, "name": e["args"]["hlo_op"]} for e in events
              if e.get("args", {}).get("hlo_module") == "jit_train_step" and "hlo_op" in e["args"]]
    total_ms, calls = defaultdict(float), defaultdict(int)
    for event in thunks:
        total_ms[event["name"]] += event["dur"] / 1e3 / steps
        calls[event["name"]] += 1
    last = launches[-1]["ts"]
    timeline = [{"start_ms": round((e["ts"] - last) / 1e3, 3), "ms": round(e["dur"] / 1e3, 3),
                 "thread": e["tid"], "thunk": e["name"]}
                for e in sorted(thunks, key=lambda e: e["ts"]) if e["ts"] >= last]
    return {"step_ms_traced": wall * 1e3,
            "thunks": [{"thunk": name, "ms_per_step": round(ms, 3), "calls_per_step": calls[name] / steps}
                       for name, ms in sorted(total_ms.items(), key=lambda item: -item[1])],
            "last_step_timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-out", type=int, default=None, help="a JumpReLU transcoder to this width")
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--matmul-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--l0-fraction", type=float, default=None, help="thresholds set for this L0 / width")
    parser.add_argument("--sparse", action="store_true", help="let the step take the sparse path (CPU)")
    parser.add_argument("--steps", type=int, default=2, help="steps traced (after two untraced)")
    args = parser.parse_args()
    one_step, _ = compiled_step(args.d_in, args.width, args.batch, 1, "float32", args.matmul_dtype,
                                args.l0_fraction, args.sparse, d_out=args.d_out)
    for _ in range(2):
        jax.block_until_ready(one_step())
    result = profile(one_step, args.steps)
    print(json.dumps({"d_in": args.d_in, "d_out": args.d_out, "width": args.width, "batch": args.batch,
                      "device": str(jax.devices()[0]), **result}))


if __name__ == "__main__":
    reexec_with_huge_pages()  # as the command line runs a step
    main()
