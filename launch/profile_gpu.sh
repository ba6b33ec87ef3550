#!/usr/bin/env bash
# Profiles (top device kernels) of the AR train step, the tokenizer train step and the sampler
# on one GPU; JSON lines with the kernel tables in $OUT/bench.jsonl.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp}
run() { echo "== $*"; timeout 170 python3 -m hita_jax.tools.bench "$@" 2>&1 | grep -v -E "^(W|I)[0-9]{4}" | tail -40; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
run gpt_train --size B --batch 64 --profile /tmp/prof_gpt
JAX_DEFAULT_PRNG_IMPL=rbg run gpt_train --size B --batch 64
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false run gpt_train --size B --batch 64
run tok_trainer --batch 16 --profile /tmp/prof_tok
run sample --size B --batch 64 --profile /tmp/prof_sample
