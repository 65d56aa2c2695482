#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, ptxas, the CUDA headers) and the SASS
# tools (cuobjdump and the nvdisasm it runs) from PyPI into a virtual environment in
# .toolchain/cuda (git-ignored) and prints nvcc's path on stdout; everything else goes to
# stderr. No GPU is needed: nvcc only compiles, cuobjdump only reads the cubins.
#
# 13.0 matches the lent GPU machines (driver 580): a newer nvcc writes PTX that their
# driver cannot load. cuobjdump and nvdisasm are 13.2 because PyPI has no 13.0 wheel of
# them; a newer disassembler reads the sm_80 and sm_90 cubins nvcc 13.0 writes, and they
# never touch the PTX. tests/sass.rs runs `cuobjdump -sass` on the embedded cubins.
#
# Idempotent: a second run checks the pins and only prints the path.
#
#   bash scripts/install-cuda-toolchain.sh
set -euo pipefail

if [ "$#" -ne 0 ]; then
  echo "usage: $0 (no arguments)" >&2
  exit 2
fi

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

install .pins-cuobjdump nvdisasm "${cuobjdump_pins[@]}"
if [ -z "$(find_tool cuobjdump)" ] || [ -z "$(find_tool nvdisasm)" ]; then
  echo "install-cuda-toolchain: no cuobjdump or nvdisasm under $venv after installing" \
    "${cuobjdump_pins[*]}" >&2
  exit 1
fi

echo "$nvcc"
