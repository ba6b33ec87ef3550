#!/usr/bin/env bash
# One node of a multi-node GPU run: starts `python -m hita_jax.main --distributed` as one JAX
# process that drives every GPU of this node, with the coordinator (process 0's host) given
# explicitly. Run it on every node with the same settings and its own NODE_RANK (slurm.sbatch does
# this under SLURM; elsewhere, e.g. `NODE_RANK=1 ... launch/gpu_node.sh` over ssh or pdsh).
#
# Settings (environment variables or flags):
#   COORDINATOR / --coordinator HOST:PORT   address of node 0 (required), e.g. node0:12355
#   NUM_NODES / --num-nodes N               number of nodes (required)
#   NODE_RANK / --node-rank I               this node, 0..N-1 (required)
#   WORKDIR / --workdir DIR                 a directory all nodes see, or gs:// (required)
#   CONFIG / --config C                     config file[:arg] (default configs/hita_l.py)
#   --dry-run                               print the command and environment instead of running
#   -- ...                                  extra hita_jax.main flags (e.g. --config.mesh=...)
set -euo pipefail

COORDINATOR=${COORDINATOR:-}
NUM_NODES=${NUM_NODES:-}
NODE_RANK=${NODE_RANK:-}
WORKDIR=${WORKDIR:-}
CONFIG=${CONFIG:-configs/hita_l.py}
DRY_RUN=${DRY_RUN:-0}
EXTRA=()

die() { echo "gpu_node.sh: $*" >&2; exit 2; }

while (($#)); do
  case $1 in
    --coordinator) COORDINATOR=$2; shift 2 ;;
    --num-nodes) NUM_NODES=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

need() { [[ -n ${!1} ]] || die "missing setting: $2 (or the environment variable $1)"; }
need COORDINATOR --coordinator
need NUM_NODES --num-nodes
need NODE_RANK --node-rank
need WORKDIR --workdir
[[ $COORDINATOR == *:* ]] || die "--coordinator must be HOST:PORT, got '$COORDINATOR'"
((NODE_RANK >= 0 && NODE_RANK < NUM_NODES)) || die "--node-rank $NODE_RANK is not in 0..$((NUM_NODES - 1))"

# XLA may take most of each GPU; NCCL picks the interconnect itself.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
export PYTHONUNBUFFERED=1
cmd=(python3 -m hita_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed
     "--coordinator_address=$COORDINATOR" "--num_processes=$NUM_NODES" "--process_id=$NODE_RANK"
     "${EXTRA[@]}")
if ((DRY_RUN)); then
  echo "# node $NODE_RANK of $NUM_NODES, coordinator $COORDINATOR"
  echo "+ XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION ${cmd[*]}"
  exit 0
fi
cd "$(dirname "$0")/.."
exec "${cmd[@]}"
