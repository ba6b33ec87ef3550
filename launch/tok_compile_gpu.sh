#!/usr/bin/env bash
# The tokenizer step's cold compile on one GPU, per variant, with XLA's pass timers and autotune
# log kept and summarised (python -m hita_jax.tools.xla_logs); records in $OUT/tok_compile.jsonl.
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh ship      # shipped step, exported to $EXP
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh options   # the export, per XLA option set (after ship)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh gemm1x1   # layers.CONV_1X1=gemm (its own build)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh scan      # tokenizer.dinov2_scan=True (its own build)
# Each part fits one 10-minute device call; `options` reads the file `ship` wrote on the same machine.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT=${OUT:-/tmp}
EXP=${EXP:-/tmp/tok_step.exp}
part=${1:?usage: tok_compile_gpu.sh ship|options|gemm1x1|scan}
mkdir -p "$OUT/autotune"
timers() {  # name, then tok_compile arguments; stderr (XLA's timers) gzipped beside the records
  local name=$1
  shift
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,hlo_pass_pipeline=1 \
    timeout "${TIMEOUT:-280}" python3 -m hita_jax.tools.tok_compile --batch 16 --variant V --steps 5 "$@" \
    >"$OUT/$name.out" 2>"$OUT/$name.err"
  grep '^{' "$OUT/$name.out" | grep -v '"stage": "lower"' | cut -c1-400
  python3 -m hita_jax.tools.xla_logs passes "$OUT/$name.err" --after '=== tok_compile: compile' --top 4
  gzip -f "$OUT/$name.err"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case $part in
  ship) timers ship --export "$EXP" --options "ship:xla_gpu_dump_autotune_logs_to=$OUT/autotune/ship.txt"
        python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/ship.txt" ;;
  options) # the legacy cuDNN convolution API (fewer algorithms a convolution than the frontend's
           # engine configurations), and the autotuner pass flipped
           for opts in ${OPTION_SETS:-nofe:xla_gpu_enable_cudnn_frontend=false \
                         legacy:xla_gpu_experimental_use_autotuner_pass=false}; do
             timers "${opts%%:*}" --from-export "$EXP" --options "$opts"
           done ;;
  gemm1x1) timers gemm1x1 --set layers.CONV_1X1=gemm \
             --options "gemm1x1:xla_gpu_dump_autotune_logs_to=$OUT/autotune/gemm1x1.txt"
           python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/gemm1x1.txt" ;;
  scan) timers scan --set tokenizer.dinov2_scan=True ;;
  *) echo "unknown part $part (ship|options|gemm1x1|scan)" >&2; exit 2 ;;
esac
