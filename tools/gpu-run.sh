#!/usr/bin/env bash
# Runs the GPU check on the lent GPU machine, from the folder tools/gpu-check.sh packed (there is
# no Rust toolchain there): every GPU test, the fused-LoRA and attention tests again under
# compute-sanitizer, the LoRA benchmark, the attention benchmark and PyTorch's SDPA at the same
# shapes. Logs go to $OUT (or ./out): machine.txt, tests.log, sanitizer.log, bench_logs.txt,
# bench_table.md, attn_table.md, torch_attn_table.md, summary.md (8 files, the device tool's
# limit); the summary is printed last.
#
# Usage (from the repo root on the device machine):  bash target/gpu-check/gpu-run.sh
# Limits (seconds, env): FK_BUDGET=330 for the whole run, and per step FK_TEST_TIMEOUT=120,
# FK_SANITIZER_TIMEOUT=75 (each of 4 runs), FK_BENCH_TIMEOUT=200, FK_ATTN_BENCH_TIMEOUT=90,
# FK_TORCH_TIMEOUT=120; FK_SKIP_SANITIZER=1, FK_SKIP_BENCH=1 (LoRA) or FK_SKIP_ATTN_BENCH=1 drop
# a step.
set -uo pipefail
pack=$(cd "$(dirname "$0")" && pwd)
# The whole-model test reads the fixtures of the carried source tree (the call runs from its root).
export FK_FIXTURES="${FK_FIXTURES:-$PWD/tests/fixtures}"
out=${OUT:-$pack/out}
mkdir -p "$out"
cd "$pack"
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }
# Every step's limit is also cut to what is left of FK_BUDGET (seconds, default 330), so the
# whole run ends inside the device call's timeout (420 s) with the summary written.
budget=${FK_BUDGET:-330}
limit() { local left=$(( budget - ($(date +%s) - start) - 10 )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

# The driver (libcuda) is normally on the loader's path; cuBLAS may only be in CUDA's or
# PyTorch's folders. cudarc dlopens libcublas.so.13 / libcublas.so.
extra=""
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], "lib"))' 2>/dev/null) \
         $(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null); do
  [ -d "$d" ] && extra="$extra:$d"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$extra"

{
  step "machine"
  date -u +%Y-%m-%dT%H:%M:%SZ
  cat BUILD_INFO 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  ldd --version 2>&1 | head -1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for l in libcuda.so.1 libcublas.so.13 libcublas.so; do
    printf '%s: ' "$l"; (ldconfig -p | grep -m1 "$l " | sed 's/.*=> //') || true; echo
  done
} 2>&1 | tee "$out/machine.txt"

# Tests: one thread; --show-output keeps the rel-L2 lines after the results. A SKIPPED line
# counts as a failure here.
test_rc=0
: >"$out/tests.log"
for t in gpu gpu_lora gpu_model gpu_attention gpu_step_ops; do
  step "tests: $t" | tee -a "$out/tests.log"
  timeout "$(limit "${FK_TEST_TIMEOUT:-120}")" "./$t" --test-threads 1 --show-output >>"$out/tests.log" 2>&1
  rc=$?
  echo "exit $rc" >>"$out/tests.log"
  [ $rc -ne 0 ] && test_rc=1
done
# On the GPU machine nothing may skip: a skip means no device, no driver or no kernels.
grep -q "^SKIPPED" "$out/tests.log" && test_rc=1
grep -E "^test |SKIPPED|panicked|test result" "$out/tests.log"

# compute-sanitizer on the fused-kernel tests (small shapes): memcheck for out-of-bounds
# accesses, racecheck for shared-memory hazards between the pipeline stages.
san_rc=-
if [ "${FK_SKIP_SANITIZER:-0}" != 1 ] && command -v compute-sanitizer >/dev/null; then
  : >"$out/sanitizer.log"
  san_rc=0
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool" | tee -a "$out/sanitizer.log"
    timeout "$(limit "${FK_SANITIZER_TIMEOUT:-75}")" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      ./gpu_lora --test-threads 1 fused_forward_matches_cpu fused_backward_matches_cpu >>"$out/sanitizer.log" 2>&1
    rc=$?
    echo "exit $rc ($tool, gpu_lora)" >>"$out/sanitizer.log"
    [ $rc -ne 0 ] && san_rc=$rc
    timeout "$(limit "${FK_SANITIZER_TIMEOUT:-75}")" compute-sanitizer --tool "$tool" --error-exitcode 99 \
      ./gpu_attention --test-threads 1 flash_attention_matches_cpu materialised_baseline >>"$out/sanitizer.log" 2>&1
    rc=$?
    echo "exit $rc ($tool, gpu_attention)" >>"$out/sanitizer.log"
    [ $rc -ne 0 ] && san_rc=$rc
  done
  grep -E "ERROR SUMMARY|exit |Hazard|Invalid" "$out/sanitizer.log" | head -20
fi

# Benchmark: GPU part only (the CPU table is measured on the development machine).
bench_rc=-
if [ "${FK_SKIP_BENCH:-0}" != 1 ]; then
  step "benchmark (short set: M = 4608, 6 FLUX shapes, r = 16/32/64)"
  # Rows go to bench_table.md as each shape finishes, so a timeout still leaves the finished ones.
  rm -f "$out/bench_table.md"
  CRITERION_HOME=/tmp/criterion FK_BENCH_CPU=0 FK_BENCH_TABLE="$out/bench_table.md" \
    timeout "$(limit "${FK_BENCH_TIMEOUT:-200}")" ./lora_matmul --bench >>"$out/bench_logs.txt" 2>&1
  bench_rc=$?
fi

# Attention: ours (benches/attention.rs) and PyTorch's SDPA backends on the same card.
attn_rc=-
torch_rc=-
if [ "${FK_SKIP_ATTN_BENCH:-0}" != 1 ]; then
  step "attention benchmark (flash vs materialised, l = 1536 / 4608, 24 × 128)"
  rm -f "$out/attn_table.md"
  FK_BENCH_TABLE="$out/attn_table.md" timeout "$(limit "${FK_ATTN_BENCH_TIMEOUT:-90}")" ./attention --bench \
    >>"$out/bench_logs.txt" 2>&1
  attn_rc=$?
  step "PyTorch SDPA at the same shapes"
  PYTHONUNBUFFERED=1 timeout "$(limit "${FK_TORCH_TIMEOUT:-120}")" python3 attn_bench_torch.py \
    --out "$out/torch_attn_table.md" >>"$out/bench_logs.txt" 2>&1
  torch_rc=$?
fi

step "done"
{
  echo
  echo "# GPU check summary ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  echo
  grep -h "^commit" BUILD_INFO 2>/dev/null
  echo "tests: $( [ $test_rc -eq 0 ] && echo PASS || echo FAIL )  sanitizer: $san_rc  bench exit: $bench_rc  attention bench: $attn_rc  torch: $torch_rc  ($(( $(date +%s) - start )) s)"
  echo
  echo "| test | result |"
  echo "|---|---|"
  sed -nE 's/^test ([a-z_0-9]+) \.\.\. (.*)$/| \1 | \2 |/p' "$out/tests.log"
  grep -h "^SKIPPED" "$out/tests.log" | sed 's/^/| skipped (counts as a failure here) | /; s/$/ |/'
  if [ -f "$out/bench_table.md" ]; then
    echo
    echo "## GPU benchmark (median of criterion samples, CUDA events)"
    echo
    cat "$out/bench_table.md"
  fi
  for t in attn_table.md torch_attn_table.md; do
    if [ -f "$out/$t" ]; then
      echo
      cat "$out/$t"
    fi
  done
} | tee "$out/summary.md"
