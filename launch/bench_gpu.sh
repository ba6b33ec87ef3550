#!/usr/bin/env bash
# Throughput benchmarks on one GPU (used for docs/PERFORMANCE.md). Each run is its own process
# so memory is released between them; results are JSON lines in $OUT/bench.jsonl.
# Usage: OUT=/tmp/out bash launch/bench_gpu.sh [gpt|sample|inception|all]
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp}
what=${1:-all}
run() { echo "== $*"; timeout 240 python3 -m hita_jax.tools.bench "$@" 2>&1 | grep -v -E "^(W|I)[0-9]{4}" | tail -3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [[ $what == all || $what == gpt ]]; then
  run gpt_train --size B --batch 64 --attn cudnn
  run gpt_train --size B --batch 64 --attn xla
  run gpt_train --size L --batch 64 --attn cudnn
fi
if [[ $what == all || $what == sample ]]; then
  run sample --size B --batch 64 --cfg 1.5
  run sample --size B --batch 256 --cfg 1.5
fi
if [[ $what == all || $what == inception ]]; then
  run inception --batch 500
fi
