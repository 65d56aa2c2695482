#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler wheels (nvcc, ptxas, the CUDA headers, cuobjdump)
# from PyPI into .toolchain/cuda (git-ignored). No GPU is needed: nvcc only compiles.
# 13.0 matches the lent GPU machines (driver 580); a newer nvcc writes PTX their driver
# cannot load. Idempotent: a second run checks the pins and prints the nvcc path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.toolchain/cuda"
pins=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
)
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv" >&2
fi
stamp="$venv/.pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
  printf '%s' "${pins[*]}" > "$stamp"
fi
nvcc="$(ls "$venv"/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1)"
if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
  echo "install-cuda-toolchain: nvcc not found under $venv after installing the wheels" >&2
  exit 1
fi
echo "$nvcc"
