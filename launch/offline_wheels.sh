#!/usr/bin/env bash
# For a GPU host that cannot reach a package index but already has jax[cuda], flax, optax, orbax,
# torch and transformers (a typical CUDA image): the wheels hita_jax needs beyond those, fetched
# on a machine that can reach PyPI, then installed on the host. Pure-Python or manylinux x86-64
# wheels for CPython 3.12, no dependencies resolved (the image has them).
#   bash launch/offline_wheels.sh download DIR [--official]  # here; --official: also what the
#       official PyTorch baseline needs (launch/official/official_bench.py: kornia, omegaconf) and
#       LPIPS's linear heads (vgg.pth, from the lpips wheel) as DIR/vgg.pth
#   bash launch/offline_wheels.sh install DIR [TARGET]       # on the host; prints the PYTHONPATH
#       line to export (TARGET defaults to /tmp/site; nothing outside TARGET is touched)
set -euo pipefail
die() { echo "offline_wheels.sh: $*" >&2; exit 2; }

# versions as in requirements.txt where it pins them; array-record and portpicker are grain's
# needs that CUDA images lack
HITA=(ml-collections==1.1.0 grain==0.2.18 'array-record>=0.8.1' portpicker==1.6.0 clu==0.0.12)
OFFICIAL=(kornia==0.9.0 kornia_rs==0.2.0 omegaconf==2.4.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 any)

cmd=${1:-}; dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  die "usage: offline_wheels.sh download DIR [--official] | install DIR [TARGET]"
fi
case $cmd in
  download)
    official=0; [ "${3:-}" = --official ] && official=1
    mkdir -p "$dir"
    args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$dir")
    for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
    pkgs=("${HITA[@]}"); [ $official = 1 ] && pkgs+=("${OFFICIAL[@]}")
    python3 -m pip download -q "${args[@]}" "${pkgs[@]}"
    if [ $official = 1 ]; then
      tmp=$(mktemp -d)
      python3 -m pip download -q "${args[@]}" -d "$tmp" lpips==0.1.4
      unzip -o -q -j "$tmp"/lpips-*.whl 'lpips/weights/v0.1/vgg.pth' -d "$dir"
      rm -rf "$tmp"
      echo "LPIPS heads: $dir/vgg.pth"
    fi
    ls "$dir" ;;
  install)
    target=${3:-/tmp/site}
    compgen -G "$dir/*.whl" >/dev/null || die "no wheels in $dir (run 'download' where PyPI is reachable)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$target" "$dir"/*.whl
    echo "export PYTHONPATH=$target\${PYTHONPATH:+:\$PYTHONPATH}" ;;
  *) die "unknown command '$cmd' (download or install)" ;;
esac
