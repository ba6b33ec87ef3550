#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice from a workstation: create it, install hita_jax on every
# worker, start the same `python -m hita_jax.main --distributed` on all of them, follow the logs,
# stop, delete. Settings come from flags or the environment variables named in brackets.
#
# Usage: launch/tpu_vm.sh [options] COMMAND [-- extra hita_jax.main flags]
# Commands:
#   create   create the TPU VM / slice (--queued: through a queued resource)
#   setup    copy this checkout (or clone --repo) to every worker and pip-install it
#   train    start training on every worker (logs in ~/hita_jax.log on each worker)
#   up       create + setup + train
#   logs     follow the log of one worker (--worker, default 0)
#   stop     stop the training processes on every worker
#   delete   delete the TPU VM (and its queued resource)
# Options:
#   --project P [PROJECT]            GCP project (required)
#   --zone Z [ZONE]                  e.g. us-east5-a (required)
#   --accelerator-type T [ACCELERATOR_TYPE]  v4-8 ... v4-4096, v5litepod-*, v5p-*, v6e-* (required)
#   --bucket gs://B [BUCKET]         checkpoints and logs go to gs://B/hita_jax/NAME (required by train)
#   --name N [TPU_NAME]              TPU VM name (default hita)
#   --config C [CONFIG]              config file[:arg] (default configs/hita_l.py)
#   --version V [RUNTIME_VERSION]    TPU software version (default: the one for the generation)
#   --repo URL [REPO]                git clone URL instead of copying this checkout
#   --queued                         create through queued resources (waits for capacity)
#   --spot                           spot / preemptible capacity
#   --worker I                       worker for `logs` (default 0)
#   --dry-run                        print the commands instead of running them
set -euo pipefail

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
BUCKET=${BUCKET:-}
TPU_NAME=${TPU_NAME:-hita}
CONFIG=${CONFIG:-configs/hita_l.py}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
REPO=${REPO:-}
QUEUED=0
SPOT=0
WORKER=0
DRY_RUN=0
COMMAND=
EXTRA=()

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while (($#)); do
  case $1 in
    --project) PROJECT=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2; shift 2 ;;
    --bucket) BUCKET=$2; shift 2 ;;
    --name) TPU_NAME=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --version) RUNTIME_VERSION=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --worker) WORKER=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|train|up|logs|stop|delete) COMMAND=$1; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n $COMMAND ]] || die "no command given: create, setup, train, up, logs, stop or delete (see --help)"

need() {  # need VAR flag: refuse to start without a setting, naming it
  [[ -n ${!1} ]] || die "missing setting: $2 (or the environment variable $1)"
}

# Hosts of a slice: v4/v5p count TensorCores (2 per chip, 4 chips per host); v5e/v6e count chips
# (up to 8 on one host, 4 per host in multi-host slices).
workers_of() {
  local type=$1 gen n
  gen=${type%-*}
  n=${type##*-}
  [[ $n =~ ^[0-9]+$ ]] || die "accelerator type '$type' is not GEN-SIZE, e.g. v5p-32"
  case $gen in
    v4|v5p) echo $(((n + 7) / 8)) ;;
    v5litepod|v5e|v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) die "accelerator type '$type': generation '$gen' is not one of v4, v5litepod (v5e), v5p, v6e" ;;
  esac
}

default_version() {
  case ${1%-*} in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod|v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

quote() {  # one argument as a shell reads it back: bare when plain, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # run or (--dry-run) print one command, quoted as a shell would need it
  if ((DRY_RUN)); then
    local a line='+'
    for a in "$@"; do line+=" $(quote "$a")"; done
    echo "$line"
  else
    "$@"
  fi
}

GCLOUD=(gcloud compute tpus)
LOCATION=(--project="$PROJECT" --zone="$ZONE")
ssh_all() { run "${GCLOUD[@]}" tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"; }

do_create() {
  need ACCELERATOR_TYPE --accelerator-type
  local version=${RUNTIME_VERSION:-$(default_version "$ACCELERATOR_TYPE")}
  local spot=()
  ((SPOT)) && spot=(--spot)
  echo "# $TPU_NAME: $ACCELERATOR_TYPE, $(workers_of "$ACCELERATOR_TYPE") worker(s), runtime $version"
  if ((QUEUED)); then
    run "${GCLOUD[@]}" queued-resources create "$TPU_NAME-qr" --node-id="$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$version" "${spot[@]}"
    echo "# queued: 'gcloud compute tpus queued-resources describe $TPU_NAME-qr --zone=$ZONE' shows when it is ACTIVE"
  else
    run "${GCLOUD[@]}" tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${spot[@]}"
  fi
}

do_setup() {
  local install='pip install -U "jax[tpu]" && pip install -e ~/hita_jax'
  if [[ -n $REPO ]]; then
    ssh_all "rm -rf ~/hita_jax && git clone --depth 1 $REPO ~/hita_jax && $install"
  else
    local root archive
    root=$(cd "$(dirname "$0")/.." && pwd)
    archive=${TMPDIR:-/tmp}/hita_jax_code.tar.gz
    run git -C "$root" archive --format=tar.gz -o "$archive" HEAD
    run "${GCLOUD[@]}" tpu-vm scp "$archive" "$TPU_NAME:hita_jax_code.tar.gz" "${LOCATION[@]}" --worker=all
    ssh_all "rm -rf ~/hita_jax && mkdir -p ~/hita_jax && tar xzf ~/hita_jax_code.tar.gz -C ~/hita_jax && $install"
  fi
}

do_train() {
  need BUCKET --bucket
  [[ $BUCKET == gs://* ]] || die "--bucket must be a gs:// path, got '$BUCKET'"
  local workdir=${BUCKET%/}/hita_jax/$TPU_NAME extra='' a
  for a in "${EXTRA[@]}"; do extra+=" $(printf '%q' "$a")"; done
  echo "# workdir $workdir; every worker runs the same command (JAX finds the coordinator itself)"
  ssh_all "cd ~/hita_jax && (nohup python3 -m hita_jax.main --config=$CONFIG --workdir=$workdir --distributed$extra > ~/hita_jax.log 2>&1 & echo \$! > ~/hita_jax.pid)"
}

# shellcheck disable=SC2016  # expanded on the workers, not here
STOP_ON_WORKER='if [ -f ~/hita_jax.pid ]; then kill "$(cat ~/hita_jax.pid)" && rm ~/hita_jax.pid; fi'

wait_active() {  # a queued resource: wait until the slice exists before setting it up
  if ((DRY_RUN)); then
    run "${GCLOUD[@]}" queued-resources describe "$TPU_NAME-qr" "${LOCATION[@]}" --format='value(state.state)'
    return
  fi
  until [[ $("${GCLOUD[@]}" queued-resources describe "$TPU_NAME-qr" "${LOCATION[@]}" \
             --format='value(state.state)') == ACTIVE ]]; do
    echo "# waiting for $TPU_NAME-qr to become ACTIVE"; sleep 60
  done
}

need PROJECT --project
need ZONE --zone
case $COMMAND in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  up) need BUCKET --bucket; do_create; if ((QUEUED)); then wait_active; fi; do_setup; do_train ;;
  logs) run "${GCLOUD[@]}" tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$WORKER" --command="tail -n 100 -f ~/hita_jax.log" ;;
  stop) ssh_all "$STOP_ON_WORKER" ;;
  delete)
    if ((QUEUED)); then
      run "${GCLOUD[@]}" queued-resources delete "$TPU_NAME-qr" "${LOCATION[@]}" --force --quiet
    else
      run "${GCLOUD[@]}" tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
    fi ;;
esac
