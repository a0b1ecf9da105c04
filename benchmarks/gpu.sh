#!/usr/bin/env bash
# The training step on one GPU: float32 and bfloat16 matmuls at the widths of
# docs/performance.md, one JSON line each, into ${OUT:-benchmarks/results}/gpu-train-step.jsonl.
set -euo pipefail
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-device.txt"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu-device.txt"
: > "$out/gpu-train-step.jsonl"
for width in 16384 131072; do
  for dtype in float32 bfloat16; do
    PYTHONPATH=. python -m gemmascope.cli bench train-step --d-in 2304 --width "$width" --batch 4096 \
      --matmul-dtype "$dtype" --steps "${STEPS:-20}" --json | tee -a "$out/gpu-train-step.jsonl"
  done
done
