#!/usr/bin/env bash
# Static checks of the sm_90a kernels' machine code, here, without a GPU (issue 17, item 4):
# compiles every kernels/*_sm90.cu for sm_90a with `ptxas -v`, disassembles it with cuobjdump, and
# fails unless each has wgmma (HGMMA) and TMA (UTMALDG) instructions and no local-memory traffic
# (LDL/STL, a stack frame or spills), and that ptxas kept their wgmma asynchronous (no "wgmma.mma_async
# instructions are serialized" note). Prints one markdown row per kernel (registers, spills,
# stack, instruction counts) for docs/attention-hopper.md.
#
# Needs nvcc (as tools/gpu-check.sh finds it) and cuobjdump + nvdisasm from NVIDIA's pip wheels
# (nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; installed into .toolchain/sass-tools on first use).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ -z "${NVCC:-}" ]; then
  for c in "$root/.toolchain/cuda-13.0/venv/lib/python3"*/site-packages/nvidia/cu13/bin/nvcc; do
    [ -x "$c" ] && NVCC=$c && break
  done
fi
[ -n "${NVCC:-}" ] || NVCC=$(tools/install-nvcc.sh)
tools_dir=$root/.toolchain/sass-tools
# cuobjdump -sass runs nvdisasm (its own wheel) found on PATH: both are needed.
find_tool() { ls "$tools_dir"/lib/python3*/site-packages/nvidia/*/bin/"$1" 2>/dev/null | head -1 || true; }
cuobjdump=$(find_tool cuobjdump)
nvdisasm=$(find_tool nvdisasm)
if [ -z "$cuobjdump" ] || [ -z "$nvdisasm" ]; then
  [ -x "$tools_dir/bin/pip" ] || python3 -m venv "$tools_dir" >&2
  "$tools_dir/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-cuobjdump>=13.2" "nvidia-cuda-nvdisasm>=13.2" >&2
  cuobjdump=$(find_tool cuobjdump)
  nvdisasm=$(find_tool nvdisasm)
fi
[ -x "$cuobjdump" ] && [ -x "$nvdisasm" ] || { echo "sass-check: cuobjdump or nvdisasm missing in $tools_dir" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PATH="$(dirname "$nvdisasm"):$(dirname "$NVCC"):$PATH"
fail=0
echo "| kernel | registers | stack frame | spill stores / loads | HGMMA | UTMALDG | LDL/STL |"
echo "|---|---|---|---|---|---|---|"
for src in kernels/*_sm90.cu; do
  stem=$(basename "$src" .cu)
  "$NVCC" -cubin -O3 -std=c++17 -Ikernels -gencode arch=compute_90a,code=sm_90a -Xptxas -v \
    -o "$work/$stem.cubin" "$src" 2>"$work/$stem.ptxas"
  "$cuobjdump" -sass "$work/$stem.cubin" >"$work/$stem.sass"
  # ptxas -v: "Compiling entry function 'NAME'", then its frame, spill and register lines.
  awk -v sass="$work/$stem.sass" '
    /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { frame = $1; spst = $5; spld = $9 }
    /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1); print name, regs, frame, spst, spld }
  ' "$work/$stem.ptxas" | while read -r name regs frame spst spld; do
    # This kernel's section of the disassembly ("Function : NAME" up to the next function).
    awk -v f="$name" '/Function : / { on = ($3 == f) } on' "$work/$stem.sass" >"$work/$name.fn"
    [ -s "$work/$name.fn" ] || { echo "sass-check: no SASS found for $name" >&2; touch "$work/failed"; }
    hg=$(grep -c 'HGMMA' "$work/$name.fn" || true)
    tma=$(grep -c 'UTMALDG' "$work/$name.fn" || true)
    local_mem=$(grep -cE '\b(LDL|STL)\b' "$work/$name.fn" || true)
    echo "| $name | $regs | $frame B | $spst / $spld B | $hg | $tma | $local_mem |"
    if [ "$hg" -eq 0 ] || [ "$tma" -eq 0 ] || [ "$local_mem" -ne 0 ] || [ "$frame" -ne 0 ] || [ "$spst" -ne 0 ]; then
      echo "sass-check: $name lacks HGMMA or UTMALDG, or uses local memory" >&2
      touch "$work/failed"
    fi
  done
  # C7510–C7515: ptxas waits for every wgmma right after issuing it (registers of an in-flight
  # wgmma touched, or too few registers to keep them): the overlaps would be gone, silently.
  if grep -q 'wgmma.mma_async instructions are serialized' "$work/$stem.ptxas"; then
    grep 'serialized' "$work/$stem.ptxas" >&2
    echo "sass-check: ptxas serialised wgmma in $src" >&2
    touch "$work/failed"
  fi
  if grep -q 'C7508\|setmaxnreg.*ignored' "$work/$stem.ptxas"; then
    echo "sass-check: ptxas ignored setmaxnreg in $src" >&2
    touch "$work/failed"
  fi
done
[ ! -e "$work/failed" ] || fail=1
exit $fail
