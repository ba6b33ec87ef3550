#!/usr/bin/env bash
# A/B timing on one GPU: `python -m hita_jax.tools.bench ARGS` of this tree and of an older tree,
# alternating (new, old, new, old, ...), each from its own directory, one JSON line per run into
# $OUT/ab.jsonl tagged new1/old1/... and the whole log into $OUT/ab_log.txt. Make the older tree
# here, before the device call, and carry it:
#   git archive REV hita_jax configs | gzip > tmp_lease/old.tar.gz
#   OLD=tmp_lease/old.tar.gz ROUNDS=2 XLA_FLAGS=... bash launch/ab_bench_gpu.sh gpt_train --size B --batch 64
set -u
: "${OLD:?OLD=<git archive of the older tree, .tar.gz>}"
OUT=${OUT:-/tmp}
ROUNDS=${ROUNDS:-2}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92} \
  TF_CPP_MIN_LOG_LEVEL=3
here=$PWD
old=$(mktemp -d /tmp/ab_old.XXXX)
tar xzf "$OLD" -C "$old" || { echo "ab_bench_gpu.sh: cannot unpack $OLD" >&2; exit 2; }
run() {  # run TAG DIR: one bench run, its JSON line tagged
  local tag=$1 dir=$2 t0=$SECONDS
  echo "=== $tag ($dir): bench $BENCH_ARGS" | tee -a "$OUT/ab_log.txt"
  (cd "$dir" && OUT='' timeout "${TMO:-400}" python3 -m hita_jax.tools.bench "${ARGS[@]}" 2>&1) \
    | grep -v -E '^(W|I)[0-9]{4}' > "$old.log"
  cat "$old.log" >> "$OUT/ab_log.txt"
  grep '^{"bench"' "$old.log" | sed "s/^{/{\"tag\": \"$tag\", /" | tee -a "$OUT/ab.jsonl" \
    | python3 -c "import sys, json
for l in sys.stdin:
  r = json.loads(l); print('$tag', {k: round(r[k], 4) for k in ('images_s', 'step_s', 'mfu') if k in r})" \
    || tail -5 "$old.log"
  echo "($tag: $((SECONDS - t0)) s)"
}
ARGS=("$@")
BENCH_ARGS="$*"
for i in $(seq 1 "$ROUNDS"); do
  run "new$i" "$here"
  run "old$i" "$old"
done
