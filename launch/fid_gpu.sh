#!/usr/bin/env bash
# FID-50k end to end on one GPU with random weights (the stage times are real, the metrics are
# not): random exports + a generated reference batch, then `configs/fid.py`. The sample stage is
# resumable, so on 10-minute device calls run this same command again until fid_report.json exists.
#   OUT=/tmp/out SIZE=B BATCH=256 LIMIT=560 bash launch/fid_gpu.sh
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=3
OUT=${OUT:-/tmp}
SIZE=${SIZE:-B}
WORK=${FID_WORK:-.fidrun}
python3 -m hita_jax.tools.random_exports --out "$WORK/random_$SIZE" --size "$SIZE" --variant V \
  --ref-images "${REF_IMAGES:-10000}" || exit 1
timeout "${LIMIT:-560}" python3 -m hita_jax.main --config="configs/fid.py:size=$SIZE" \
  --workdir="$WORK/fid_$SIZE" --config.init.gpt="$WORK/random_$SIZE/gpt" \
  --config.init.tokenizer="$WORK/random_$SIZE/tokenizer" \
  --config.evaluate.ref_npz="$WORK/random_$SIZE/ref.npz" --config.evaluate.inception_weights=random \
  --config.sample.per_device_batch="${BATCH:-256}" --config.sample.num_images="${NUM_IMAGES:-50000}" \
  2>&1 | grep -v -E "^(W|I)[0-9]{4}"
rc=${PIPESTATUS[0]}
cp "$WORK/fid_$SIZE"/sample_timings.json "$WORK/fid_$SIZE"/fid_report.json "$OUT"/ 2>/dev/null
echo "fid_gpu.sh: main exited $rc (124 = stopped by LIMIT; run again to resume)"
exit "$rc"
