#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, ptxas, the CUDA headers) from PyPI
# into a virtual environment in .toolchain/cuda (git-ignored) and prints nvcc's path on
# stdout; everything else goes to stderr. No GPU is needed: nvcc only compiles.
#
# 13.0 matches the lent GPU machines (driver 580): a newer nvcc writes PTX that their
# driver cannot load. Idempotent: a second run checks the pins and only prints the path.
#
#   bash scripts/install-cuda-toolchain.sh                     # nvcc
#   bash scripts/install-cuda-toolchain.sh --with-cuobjdump    # nvcc, and cuobjdump
#
# --with-cuobjdump also installs cuobjdump and the nvdisasm it runs (`cuobjdump -sass`
# disassembles a cubin) into the same environment. Their wheels have no 13.0 release; the
# oldest, 13.2, reads the sm_80 and sm_90 cubins nvcc 13.0 writes. The path of cuobjdump
# is printed on stderr.
set -euo pipefail

with_cuobjdump=0
for arg in "$@"; do
  case "$arg" in
    --with-cuobjdump) with_cuobjdump=1 ;;
    *) echo "usage: $0 [--with-cuobjdump]" >&2; exit 2 ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.toolchain/cuda"
pins=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
)
# cuobjdump runs nvdisasm to print SASS.
cuobjdump_pins=("nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*")

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv" >&2
fi

# install STAMP TOOL PIN...: pip-installs the pins unless STAMP records them and TOOL exists.
install() {
  local stamp="$venv/$1" tool="$2"
  shift 2
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$*" ] && [ -n "$(find_tool "$tool")" ]; then
    return
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
  printf '%s' "$*" > "$stamp"
}

# The wheels put the CUDA 13 tools in site-packages/nvidia/cu13/bin.
find_tool() {
  local found
  for found in "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/"$1"; do
    if [ -x "$found" ]; then
      echo "$found"
      return
    fi
  done
}

install .pins nvcc "${pins[@]}"
nvcc="$(find_tool nvcc)"
if [ -z "$nvcc" ]; then
  echo "install-cuda-toolchain: no nvcc under $venv after installing ${pins[*]}" >&2
  exit 1
fi

if [ "$with_cuobjdump" = 1 ]; then
  install .pins-cuobjdump nvdisasm "${cuobjdump_pins[@]}"
  cuobjdump="$(find_tool cuobjdump)"
  if [ -z "$cuobjdump" ] || [ -z "$(find_tool nvdisasm)" ]; then
    echo "install-cuda-toolchain: no cuobjdump or nvdisasm under $venv after installing" \
      "${cuobjdump_pins[*]}" >&2
    exit 1
  fi
  echo "cuobjdump: $cuobjdump" >&2
fi

echo "$nvcc"
