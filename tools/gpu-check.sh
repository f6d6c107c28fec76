#!/usr/bin/env bash
# The one-call GPU check, build side. Builds here (no GPU needed) the release test binaries, the
# benchmarks and the flux-kernels binary (for `bench-step`, the engine's whole training step) with
# the CUDA kernels compiled by nvcc, stripped, and packs them with tools/gpu-run.sh,
# tools/scaling.sh and the PyTorch scripts into one folder that the device tool carries to the
# lent GPU machine, where gpu-run.sh runs everything (there is no Rust there). The binaries travel
# as one xz tarball (bin.tar.xz; gpu-run.sh unpacks it): loose, they come to more than the 64 MiB
# a device call carries. Prints the exact device call at the end.
#
# Usage:  tools/gpu-check.sh [PACK_DIR]          (default target/gpu-check; git ignores target/)
#         tools/gpu-check.sh --emulate [--asan]   CPU pre-flight instead: builds the CUDA emulator
#             of kernels/host_emulation.h as a stand-in libcuda.so/libcublas.so and runs the GPU
#             tests against it (kernel index math, barriers, bounds, fragment layouts, the host's
#             launches and the cuBLAS mapping, everything but the real hardware).
# Needs nvcc: $NVCC, or tools/install-nvcc.sh's default install, or /tmp/nvcc.path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ -z "${NVCC:-}" ]; then
  for c in "$root/.toolchain/cuda-13.0/venv/lib/python3"*/site-packages/nvidia/cu13/bin/nvcc "$(cat /tmp/nvcc.path 2>/dev/null)"; do
    [ -x "$c" ] && NVCC=$c && break
  done
fi
[ -n "${NVCC:-}" ] || NVCC=$(tools/install-nvcc.sh)
export NVCC FLUX_KERNELS_REQUIRE_CUDA=1
# cargo's output folder (CARGO_TARGET_DIR when set).
tdir=${CARGO_TARGET_DIR:-$root/target}

if [ "${1:-}" = "--emulate" ]; then
  emu=$tdir/emu
  mkdir -p "$emu/include"
  # ptx_sm80.h includes <cuda_bf16.h> on a GPU; under the emulation host_emulation.h provides it.
  echo '// host emulation: the bf16 helpers come from host_emulation.h' >"$emu/include/cuda_bf16.h"
  names=$(sed -nE 's/^FK_KERNEL void (__launch_bounds__\([^)]*\) )?([a-z_0-9]+)\(.*/\2/p' kernels/*.cu)
  {
    echo '#define FK_HOST_EMULATION 1'
    echo '#include "host_emulation.h"'
    for f in kernels/*.cu; do echo "#include \"$(basename "$f")\""; done
    printf '#define FKEMU_KERNELS(X)'; for n in $names; do printf ' X(%s)' "$n"; done; echo
    echo '#define FKEMU_DRIVER 1'
    echo '#include "host_emulation.h"'
  } >"$emu/driver.cpp"
  printf '#define FKEMU_CUBLAS 1\n#include "host_emulation.h"\n' >"$emu/cublas.cpp"
  flags=(-std=c++17 -O2 -g -fPIC -shared -Wall -Wno-unknown-pragmas -Wno-psabi -I"$emu/include" -Ikernels)
  preload=""
  if [ "${2:-}" = "--asan" ]; then
    flags+=(-fsanitize=address -fno-omit-frame-pointer)
    preload=$(g++ -print-file-name=libasan.so)
    export ASAN_OPTIONS=detect_leaks=0
  fi
  g++ "${flags[@]}" -o "$emu/libcuda.so" "$emu/driver.cpp"
  g++ "${flags[@]}" -o "$emu/libcublas.so" "$emu/cublas.cpp"
  echo "emulated libcuda.so / libcublas.so in $emu"
  # Every GPU test must run here: a skip (kernels missing, the emulator not found) fails the test
  # instead of passing silently (tests/common/mod.rs, skip).
  export FK_REQUIRE_GPU=1
  # gpu_data_parallel runs only here: two ranks through the emulated NCCL, which reads host memory.
  cargo test --no-run --test gpu --test gpu_lora --test gpu_model --test gpu_attention --test gpu_step_ops \
    --test gpu_model_ops --test gpu_flux_step --test gpu_plan --test gpu_step_trace --test gpu_data_parallel
  LD_PRELOAD=$preload LD_LIBRARY_PATH="$emu" cargo test --test gpu --test gpu_lora --test gpu_model --test gpu_attention \
    --test gpu_step_ops --test gpu_model_ops --test gpu_flux_step --test gpu_plan --test gpu_step_trace \
    --test gpu_data_parallel -- --test-threads 2
  exit
fi

pack=${1:-$tdir/gpu-check}
export CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_BENCH_STRIP=symbols
log=$(mktemp)
cargo test --release --no-run --test gpu --test gpu_lora --test gpu_model --test gpu_attention --test gpu_step_ops \
  --test gpu_model_ops --test gpu_flux_step --test gpu_plan --test gpu_step_trace 2>&1 | tee "$log"
cargo bench --no-run --bench lora_matmul --bench attention --bench mixed_lora_batch 2>&1 | tee -a "$log"
cargo build --release --bin flux-kernels
rm -rf "$pack"
mkdir -p "$pack/bin"
# "Executable tests/gpu_lora.rs (target/release/deps/gpu_lora-…)"
sed -nE 's/.*Executable (tests|benches)\/([a-z_0-9]+)\.rs \(([^)]+)\).*/\2 \3/p' "$log" | while read -r name exe; do
  cp "$exe" "$pack/bin/$name"
done
rm -f "$log"
cp "$tdir/release/flux-kernels" "$pack/bin/"
for b in gpu gpu_lora gpu_model gpu_attention gpu_step_ops gpu_model_ops gpu_flux_step gpu_plan gpu_step_trace lora_matmul attention mixed_lora_batch flux-kernels; do
  [ -x "$pack/bin/$b" ] || { echo "gpu-check: $b was not built" >&2; exit 1; }
done
# xz: about 6× smaller than the loose binaries (gzip: about 3×); where the GPU machine has no xz,
# gpu-run.sh unpacks with Python's tarfile (lzma is in the standard library).
du -sh "$pack/bin"
tar -C "$pack/bin" -cf - . | xz -T2 -6 >"$pack/bin.tar.xz"
rm -rf "$pack/bin"
cp tools/gpu-run.sh tools/scaling.sh tools/attn_bench_torch.py tools/torch_flux_lora_step.py "$pack/"
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' + uncommitted changes')"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $("$NVCC" --version | tail -1)"
} >"$pack/BUILD_INFO"
du -sh "$pack"
rel=${pack#"$root"/}
whl=""
[ -n "$(ls .whl/*.whl 2>/dev/null)" ] && whl=', ".whl"'
cat <<MSG

Packed into $rel. On the lent GPU (one call, about 6 minutes):
  device run: command "bash $rel/gpu-run.sh", carry ["$rel"$whl], timeout_s 420
The engine-step section (side-by-side settings, PyTorch step, scaling grid: about a minute per
call) needs more than the default FK_BUDGET=330 leaves; a call that gives it most of a 10-minute
command (the tests first; no sanitizer, LoRA or attention benchmark):
  device run: command "FK_BUDGET=540 FK_SKIP_SANITIZER=1 FK_SKIP_BENCH=1 FK_SKIP_ATTN_BENCH=1 bash $rel/gpu-run.sh",
              carry ["$rel"$whl], timeout_s 600
(The PyTorch training step needs diffusers, carried as wheels in .whl/: docs/side-by-side.md.)
Logs come back from \$OUT (machine.txt, tests.log, sanitizer.log, bench_logs.txt,
bench_table.md, attn_table.md (ours and PyTorch's SDPA), step_table.md (engine step, PyTorch
step, scaling grid with its CSV), summary.md); record the run in docs/gpu-runs.md.
MSG
