#!/usr/bin/env bash
# The performance suite on one GPU, in parts that each fit one 10-minute device call; run the parts
# back to back on one lease, then `python -m hita_jax.tools.perf_suite report $OUT`.
#   OUT=/tmp/out bash launch/perf_suite_gpu.sh ours
#   OUT=/tmp/out OFFICIAL_HITA=.official/Hita LPIPS_LIN=.official/vgg.pth bash launch/perf_suite_gpu.sh official
# Extra arguments go to `perf_suite run` (e.g. --only ar_train:B:64 sample:B:64).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp}
part=${1:?usage: perf_suite_gpu.sh ours|official [perf_suite run args]}
shift
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m hita_jax.tools.perf_suite run "$part" --out "$OUT" "$@" 2>&1 | grep -v -E "^(W|I)[0-9]{4}"
