#!/usr/bin/env bash
# The tokenizer step's cold compile on one GPU, per variant, with XLA's pass timers, priority
# fusion's per-fusion log and the autotune log kept and summarised (python -m
# hita_jax.tools.xla_logs passes|fusion|autotune); records in $OUT/tok_compile.jsonl.
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh ship      # shipped step, exported to $EXP
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh options   # the export, per XLA option set (after ship)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh gemm1x1   # layers.CONV_1X1=gemm (its own build)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh scan      # tokenizer.dinov2_scan=True (its own build)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh group     # training.FLAT_CONCAT_GROUP=$GROUP (default 23)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh smaller   # tokenizer.dropout_rng=hash + dinov2_scan=True
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh all       # smaller + CONV_1X1=gemm + FLAT_CONCAT_GROUP=$GROUP
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh norms     # the shipped step, then with the LayerNorms and
#     LPIPS tap norms fused (the spelling before 2026-12-07), a process each
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh errata    # the shipped step with its autotune log,
#     then again with the cuDNN engines that never came within $WITHIN (1.5) x of an instruction's
#     best excluded (xla_logs errata -> $CUDNN_ERRATA_JSON_FILE; KNOBS=1: their knob settings too),
#     a process each, with the timeline (~6 min)
#   OUT=/tmp/out bash launch/tok_compile_gpu.sh probe     # which op kind each of $OPTION_SETS breaks
#     (python -m hita_jax.tools.xla_option_probe: 10 small programs x (base + each set), a process each,
#     a few seconds a process; stops at $DEADLINE s, 420 by default, and still writes its summary)
# Each part fits one 10-minute device call; `options` reads the file `ship` wrote on the same machine.
# PF_LOG=0: no per-fusion log (its lines cost priority fusion some time: for clean compile A/Bs);
# DUMP_AUTOTUNE=0: no autotune log for ship / gemm1x1. TIMELINE=1: the autotuner's VLOG lines and
# `xla_logs timeline` (its enumeration / compile / serial timing phases).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
OUT=${OUT:-/tmp}
EXP=${EXP:-/tmp/tok_step.exp}
part=${1:?usage: tok_compile_gpu.sh ship|options|gemm1x1|scan|group|smaller|all|norms|errata|probe}
mkdir -p "$OUT/autotune"
timers() {  # name, then tok_compile arguments; stderr (XLA's timers) gzipped beside the records
  local name=$1
  shift
  # priority_fusion=2 logs each fusion (with its producer's metadata): ~2 lines a fusion
  local vmodule=gpu_compiler=1,hlo_pass_pipeline=1
  [ "${PF_LOG:-1}" = 1 ] && vmodule=$vmodule,priority_fusion=2
  [ "${TIMELINE:-0}" = 1 ] && vmodule=$vmodule,config_assigner=1,autotuner=2,config_runner=2
  # cuda_dnn=4: a line per cuDNN plan an errata file excludes ('Exclude engine (runtime): <tag>')
  [ "${DNN_LOG:-0}" = 1 ] && vmodule=$vmodule,cuda_dnn=4
  TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=$vmodule \
    timeout "${TIMEOUT:-280}" python3 -m hita_jax.tools.tok_compile --batch 16 --variant V --steps 5 "$@" \
    >"$OUT/$name.out" 2>"$OUT/$name.err"
  grep '^{' "$OUT/$name.out" | grep -v '"stage": "lower"' | cut -c1-400
  python3 -m hita_jax.tools.xla_logs passes "$OUT/$name.err" --after '=== tok_compile: compile' --top 4
  [ "${TIMELINE:-0}" = 1 ] && python3 -m hita_jax.tools.xla_logs timeline "$OUT/$name.err" \
    --after '=== tok_compile: compile' | cut -c1-400
  [ "${PF_LOG:-1}" = 1 ] && python3 -m hita_jax.tools.xla_logs fusion "$OUT/$name.err" \
    --after '=== tok_compile: compile' --top 12 >"$OUT/$name.fusion.txt" && head -30 "$OUT/$name.fusion.txt" | cut -c1-240
  gzip -f "$OUT/$name.err"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case $part in
  # xla_hlo_print_inline_stack_frames: the fusion log's metadata names source lines (printing only)
  ship) if [ "${DUMP_AUTOTUNE:-1}" = 1 ]; then
          timers ship --export "$EXP" \
            --options "ship:xla_gpu_dump_autotune_logs_to=$OUT/autotune/ship.txt,xla_hlo_print_inline_stack_frames=true"
          python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/ship.txt"
        else
          timers ship --export "$EXP"
        fi ;;
  options) # deterministic ops: cuDNN offers only its deterministic engine configurations (fewer
           # to autotune; the step may slow). (xla_gpu_enable_cudnn_frontend and
           # xla_gpu_experimental_use_autotuner_pass are not options of jax 0.11.2's XLA.)
           for opts in ${OPTION_SETS:-det:xla_gpu_deterministic_ops=true}; do
             name=${opts%%:*}
             timers "$name" --from-export "$EXP" \
               --options "$opts,xla_gpu_dump_autotune_logs_to=$OUT/autotune/$name.txt"
             [ -f "$OUT/autotune/$name.txt" ] && python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/$name.txt"
           done ;;
  gemm1x1) if [ "${DUMP_AUTOTUNE:-1}" = 1 ]; then
             timers gemm1x1 --set layers.CONV_1X1=gemm \
               --options "gemm1x1:xla_gpu_dump_autotune_logs_to=$OUT/autotune/gemm1x1.txt,xla_hlo_print_inline_stack_frames=true"
             python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/gemm1x1.txt"
           else
             timers gemm1x1 --set layers.CONV_1X1=gemm
           fi ;;
  scan) timers scan --set tokenizer.dinov2_scan=True ;;
  group) timers group --set "training.FLAT_CONCAT_GROUP=${GROUP:-23}" ;;
  smaller) timers smaller --set tokenizer.dropout_rng=hash --set tokenizer.dinov2_scan=True ;;
  all) timers all --set tokenizer.dropout_rng=hash --set tokenizer.dinov2_scan=True \
         --set layers.CONV_1X1=gemm --set "training.FLAT_CONCAT_GROUP=${GROUP:-23}" ;;
  norms) timers split
         timers fused --set layers.LAYER_NORM=fused --set lpips.TAP_NORM=fused ;;
  errata) TIMELINE=1 timers ship --options "ship:xla_gpu_dump_autotune_logs_to=$OUT/autotune/ship.txt"
          knobs=(); [ "${KNOBS:-0}" = 1 ] && knobs=(--knobs)
          python3 -m hita_jax.tools.xla_logs errata "$OUT/autotune/ship.txt" --within "${WITHIN:-1.5}" \
            "${knobs[@]}" --out "$OUT/errata.json" | cut -c1-400
          export CUDNN_ERRATA_JSON_FILE=$OUT/errata.json  # read once, when cuDNN first builds a plan
          DNN_LOG=1 TIMELINE=1 timers errata --options "errata:xla_gpu_dump_autotune_logs_to=$OUT/autotune/errata.txt"
          unset CUDNN_ERRATA_JSON_FILE
          # the plans the file removed, per operation tag: proof its rules match XLA's plan tags
          echo "excluded plans (runtime errata), by operation:"
          zcat "$OUT/errata.err.gz" | grep -o 'Exclude engine (runtime): [A-Za-z]*' | sort | uniq -c
          for name in ship errata; do
            python3 -m hita_jax.tools.xla_logs autotune "$OUT/autotune/$name.txt" | cut -c1-400
            gzip -f "$OUT/autotune/$name.txt"
          done ;;
  # the two sets whose compiled step failed at its first call (IndexError: raw_hash_map<>::at)
  probe) # shellcheck disable=SC2086  # one word per set
         python3 -m hita_jax.tools.xla_option_probe --deadline "${DEADLINE:-420}" \
           --options ${OPTION_SETS:-exnd:xla_gpu_exclude_nondeterministic_ops=true det:xla_gpu_deterministic_ops=true} \
           | cut -c1-400 ;;
  *) echo "unknown part $part (ship|options|gemm1x1|scan|group|smaller|all|norms|errata|probe)" >&2; exit 2 ;;
esac
