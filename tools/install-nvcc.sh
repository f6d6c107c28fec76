#!/usr/bin/env bash
# Installs nvcc 13.0 from NVIDIA's pip wheels into a local folder and prints the NVCC path.
#
# Usage: tools/install-nvcc.sh [DIR]        (default DIR: .toolchain/cuda-13.0 in the repo)
# Then:  NVCC=$(tools/install-nvcc.sh) cargo build --release
#
# Every component is pinned to the CUDA 13.0 update 2 release: without the pins pip pulls a
# newer nvvm/crt (13.5) whose cicc does not match nvcc 13.0, and PTX from a newer nvcc may not
# load on the lent GPUs' driver (580, CUDA 13.0). cccl has no 13.0.88 build; 13.0.85 is the
# CCCL that ships with that release.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$here/.toolchain/cuda-13.0}
py=${PYTHON:-python3}

pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
)

if [ ! -x "$dir/venv/bin/python" ]; then
  "$py" -m venv "$dir/venv" >&2
fi
"$dir/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2

site=$("$dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cu="$site/nvidia/cu13"
nvcc="$cu/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  echo "install-nvcc: nvcc not found at $nvcc after install" >&2
  exit 1
fi
# The wheels keep cicc under nvvm/bin; nvcc finds it relative to its own bin/ through nvcc.profile,
# which the wheel ships. Check the whole chain once so a broken install fails here, not in build.rs.
"$nvcc" --version >&2
echo "$nvcc"
