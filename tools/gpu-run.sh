#!/usr/bin/env bash
# Runs the GPU check on the lent GPU machine, from the folder tools/gpu-check.sh packed (there is
# no Rust toolchain there): every GPU test, the fused-LoRA and attention tests again under
# compute-sanitizer, the LoRA benchmark, the attention benchmark and PyTorch's SDPA at the same
# shapes, then, while the budget lasts, the engine's whole training step (`flux-kernels
# bench-step`) at the side-by-side settings, PyTorch's training step at the same settings
# (tools/torch_flux_lora_step.py) and the scaling grid (tools/scaling.sh). Logs go to $OUT (or
# ./out): machine.txt, tests.log, sanitizer.log, bench_logs.txt (every log, and the raw JSON line
# of every bench-step call: grep '^{'), bench_table.md, attn_table.md (ours, then PyTorch's
# SDPA), step_table.md (engine step, PyTorch step, scaling grid and its CSV for
# tools/plot_scaling.py), summary.md: 8 files, the device tool's limit. The summary is printed last.
#
# Usage (from the repo root on the device machine):  bash target/gpu-check/gpu-run.sh
# Limits (seconds, env): FK_BUDGET=330 for the whole run, and per step FK_TEST_TIMEOUT=120,
# FK_SANITIZER_TIMEOUT=75 (each of 4 runs), FK_BENCH_TIMEOUT=200, FK_ATTN_BENCH_TIMEOUT=90,
# FK_TORCH_TIMEOUT=120, FK_MIXED_TIMEOUT=90 (FK_MIXED_SIDE=512, FK_SKIP_MIXED=1), FK_STEP_TIMEOUT=240 (each bench-step call); FK_SKIP_SANITIZER=1,
# FK_SKIP_BENCH=1 (LoRA), FK_SKIP_ATTN_BENCH=1 or FK_SKIP_ENGINE=1 (engine step, PyTorch step
# and scaling grid) drop a step; FK_SKIP_SIDE_BY_SIDE=1, FK_SKIP_TORCH_STEP=1 and
# FK_SKIP_SCALING=1 drop one part of it (a second call for the rest of the grid: the first two),
# FK_SCALING_BASE=bf16 runs the grid on the bf16 base. The engine section starts a call only while FK_BUDGET leaves its
# estimated cost (40 s at 512², 60 s at 1024², 90 s for PyTorch's four settings; longer once a
# call has taken longer) and writes `skipped: budget` otherwise: the default budget leaves it
# little, FK_BUDGET=540 with a 600 s device call gives it most of a 10-minute command.
# PyTorch's step needs diffusers: carry the wheels in .whl/ (docs/side-by-side.md); they are
# installed into /tmp/fk-site.
set -uo pipefail
pack=$(cd "$(dirname "$0")" && pwd)
callroot=$PWD
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
left() { echo $(( budget - ($(date +%s) - start) - 10 )); }

# The binaries travel as one tarball (gpu-check.sh: loose they exceed what a call carries).
if [ -f bin.tar.xz ]; then
  tar -xJf bin.tar.xz 2>/dev/null ||
    python3 -c 'import sys, tarfile as t; f = t.open(sys.argv[1]); f.extractall(".", **({"filter": "data"} if hasattr(t, "data_filter") else {}))' bin.tar.xz ||
    echo "gpu-run: could not unpack bin.tar.xz" >&2
fi

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
for t in gpu gpu_lora gpu_model gpu_attention gpu_step_ops gpu_model_ops gpu_flux_step gpu_plan gpu_step_trace; do
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
  # The device-resident step's kernels and one whole tiny-model step (every new activation
  # buffer NaN-poisoned there): out-of-bounds and misaligned device accesses. memcheck only:
  # these kernels share nothing through shared memory between warps.
  for t in "gpu_model_ops" "gpu_flux_step device_resident_step_matches_cpu"; do
    step "compute-sanitizer --tool memcheck ($t)" | tee -a "$out/sanitizer.log"
    # shellcheck disable=SC2086
    timeout "$(limit "${FK_SANITIZER_TIMEOUT:-75}")" compute-sanitizer --tool memcheck --error-exitcode 99 \
      ./$t --test-threads 1 >>"$out/sanitizer.log" 2>&1
    rc=$?
    echo "exit $rc (memcheck, $t)" >>"$out/sanitizer.log"
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
  # Appended to attn_table.md (one file for both: the device tool brings back 8 files at most).
  tt=$(mktemp)
  PYTHONUNBUFFERED=1 timeout "$(limit "${FK_TORCH_TIMEOUT:-120}")" python3 attn_bench_torch.py \
    --out "$tt" >>"$out/bench_logs.txt" 2>&1
  torch_rc=$?
  [ -s "$tt" ] && { echo; cat "$tt"; } >>"$out/attn_table.md"
  rm -f "$tt"
fi

# Mixed-LoRA batches (issue 20, benches/mixed_lora_batch.rs): 8 images with 8 different random
# LoRAs (r 16–64, every block linear) in one batch, against one LoRA for all 8 and the 8 one after
# another, FLUX.1-dev's size with random weights. Appended to bench_table.md (the call brings
# back few files).
mixed_rc=-
if [ "${FK_SKIP_MIXED:-0}" != 1 ]; then
  step "mixed-LoRA batch (8 images, 8 LoRAs, ${FK_MIXED_SIDE:-512}² px, random FLUX.1-dev)"
  mt=$(mktemp)
  FK_BENCH_DEVICE=cuda FK_BENCH_MODEL=random:flux1-dev FK_BENCH_SIDE="${FK_MIXED_SIDE:-512}" FK_BENCH_TXT=512 \
    FK_BENCH_STEPS=2 FK_BENCH_REPS=1 timeout "$(limit "${FK_MIXED_TIMEOUT:-90}")" ./mixed_lora_batch --bench \
    >"$mt" 2>&1
  mixed_rc=$?
  cat "$mt" >>"$out/bench_logs.txt"
  { echo; echo "## Mixed-LoRA batch (issue 20; exit $mixed_rc)"; echo; grep -E '^\||^mixed' "$mt"; } >>"$out/bench_table.md"
  rm -f "$mt"
fi

# Engine step (issue #6): whole training steps of flux-kernels (forward, backward, AdamW) at the
# side-by-side settings, PyTorch's at the same settings, then the scaling grid. Every call's raw
# JSON line goes to bench_logs.txt, the tables to step_table.md.
eng_rc=-
torch_step_rc=-
scaling_rc=-
if [ "${FK_SKIP_ENGINE:-0}" != 1 ]; then
  step "engine step: flux-kernels bench-step (side by side), PyTorch step, scaling grid"
  eng_rc=0
  smd=$out/step_table.md
  tmpd=$(mktemp -d)
  ejson=$tmpd/engine.jsonl
  : >"$ejson"
  declare -A cost=([512]=40 [768]=50 [1024]=60 [1536]=90)
  jnum() { sed -nE "s/.*\"$1\"[[:space:]]*:[[:space:]]*(-?[0-9][0-9.eE+-]*).*/\1/p" <<<"$2" | head -1; }
  steps=${FK_STEP_STEPS:-3}
  warm=${FK_STEP_WARMUP:-1}
  {
    echo "## Engine training step (flux-kernels bench-step)"
    echo
    echo "Random FLUX.1-dev weights, batch 1, 512 T5 tokens, LoRA rank 32 on attn-mlp, AdamW; step time is"
    echo "the median of $steps steps after $warm warm-up; peak is the memory pool's high-water mark of allocated bytes (as torch.cuda.max_memory_allocated), and the prediction is the plan less the CUDA context and cuBLAS workspace;"
    echo "predicted is \`flux-kernels plan\` (a model, not a measurement); the step-time model's prediction is"
    echo "\`bench-step --predict\` on the trace of one more step (plan::steptime, docs/step-time.md; the breakdown is in bench_logs.txt)."
    echo
    echo "| base | resolution | checkpointing | kernels | step (s, median) | steps (s) | step-time model (s, prediction) | peak (GiB, measured) | predicted by plan, allocated (GiB) | load (s) | wall (s) | status |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  } >"$smd"
  # The goal configuration first (int8, 1024², checkpointing), then the rest of the side-by-side
  # settings, then 1024² without checkpointing.
  # kernels: auto = the sm_90a kernels on an H100/H200; sm80 = the same step on the sm_80 kernels
  # (cuBLAS-base LoRA, FA2-style attention), the side-by-side of what the Hopper kernels bring.
  # An optional fifth field swaps that many blocks (--blocks-to-swap): the int8 1024² row again
  # with 55 blocks swapped (what `plan --max-vram 8` chooses at rank 32, the rows' rank, docs/memory.md), to
  # measure block swap's cost against the first row. An optional sixth field `offload` keeps the
  # checkpointed block inputs in pinned host memory (--offload-checkpoints): the bf16 1024² row
  # again, its cost and memory against the second row.
  for cfg in int8:1024:true:auto bf16:1024:true:auto bf16:1024:true:sm80 int8:512:true:auto bf16:512:true:auto \
    bf16:1024:false:auto int8:1024:false:auto int8:1024:true:auto:55 bf16:1024:true:auto:0:offload; do
    IFS=: read -r b sz ck kern swap off <<<"$cfg"
    swap=${swap:-0}
    off_flag=()
    [ "${off:-}" = offload ] && off_flag=(--offload-checkpoints)
    if [ "$ck" = true ]; then ck_flag=--gradient-checkpointing; else ck_flag=--no-gradient-checkpointing; fi
    stepv=""; stepsv=""; model=""; peak=""; pred=""; load=""; wall=""; line=""
    if [ "${FK_SKIP_SIDE_BY_SIDE:-0}" = 1 ]; then
      status="skipped: FK_SKIP_SIDE_BY_SIDE=1"
    elif [ "$(left)" -lt "${cost[$sz]}" ]; then
      status="skipped: budget"
    else
      step "bench-step $b ${sz}² checkpointing $ck kernels $kern blocks swapped $swap" | tee -a "$out/bench_logs.txt"
      t0=$(date +%s)
      lim=$(limit "${FK_STEP_TIMEOUT:-240}")
      timeout "$lim" ./flux-kernels bench-step --model random:flux1-dev --resolution "$sz" --rank 32 --targets attn-mlp \
        --base "$b" "$ck_flag" --kernels "$kern" --blocks-to-swap "$swap" "${off_flag[@]}" --steps "$steps" --warmup "$warm" --predict --json \
        >"$tmpd/step.out" 2>"$tmpd/step.err"
      rc=$?
      wall=$(( $(date +%s) - t0 ))
      [ "$wall" -gt "${cost[$sz]}" ] && cost[$sz]=$wall
      cat "$tmpd/step.err" >>"$out/bench_logs.txt"
      line=$(grep -E '^[[:space:]]*\{' "$tmpd/step.out" | tail -1)
      if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="timeout: $lim s"
      elif [ $rc -ne 0 ]; then
        # The error line: the last one that says error / panicked / out of memory, else the last line.
        msg=$(grep -iE 'error|panicked|out of memory' "$tmpd/step.err" | tail -1)
        [ -n "$msg" ] || msg=$(grep -v '^[[:space:]]*$' "$tmpd/step.err" | tail -1)
        status="failed: exit $rc: $(tr '|\n' '/ ' <<<"$msg" | sed 's/ *$//' | cut -c1-120)"
      elif [ -z "$line" ]; then
        status="failed: no JSON line on stdout"
      else
        status=ok
      fi
      echo "exit $rc after $wall s" >>"$out/bench_logs.txt"
      if [ "$status" = ok ]; then
        echo "$line" | tee -a "$ejson" >>"$out/bench_logs.txt"
        stepv=$(jnum step_s_median "$line")
        stepsv=$(sed -nE 's/.*"step_s"[[:space:]]*:[[:space:]]*\[([^]]*)\].*/\1/p' <<<"$line" | tr -d ' ' | sed 's/,/, /g')
        model=$(jnum predicted_step_s "$line")
        peak=$(jnum peak_gib "$line")
        pred=$(jnum predicted_allocated_gib "$line")  # comparable with peak_gib (pool high-water mark)
        load=$(jnum load_s "$line")
      else
        eng_rc=1
      fi
    fi
    if [ -z "$pred" ] && [ -x ./flux-kernels ]; then
      pred=$(./flux-kernels plan --model flux1-dev --resolution "$sz" --rank 32 --targets attn-mlp --base "$b" \
        "$ck_flag" --blocks-to-swap "$swap" "${off_flag[@]}" 2>/dev/null | sed -nE 's/.*total on the GPU \(predicted\) +([0-9.]+) GiB.*/\1/p' | head -1 |
        awk '{ printf "%.2f\n", $1 - 0.53125 }')  # less the CUDA context and cuBLAS workspace
    fi
    [ "$swap" = 0 ] || b="$b, $swap blocks swapped"
    [ "${off:-}" = offload ] && b="$b, checkpoints offloaded"
    echo "| $b | ${sz}² | $ck | $kern | ${stepv:--} | ${stepsv:--} | ${model:--} | ${peak:--} | ${pred:--} | ${load:--} | ${wall:--} | $status |" >>"$smd"
  done

  # PyTorch's training step (diffusers + PEFT) at the same settings: bf16, 512² and 1024², with
  # and without checkpointing (the four rows of docs/side-by-side.md), same steps and warm-up.
  {
    echo
    echo "## PyTorch training step (tools/torch_flux_lora_step.py, same card, same call)"
    echo
  } >>"$smd"
  if [ "${FK_SKIP_TORCH_STEP:-0}" = 1 ]; then
    echo "skipped: FK_SKIP_TORCH_STEP=1" >>"$smd"
  elif [ "$(left)" -lt "${FK_TORCH_STEP_COST:-90}" ]; then
    echo "skipped: budget ($(left) s left, ${FK_TORCH_STEP_COST:-90} s estimated)" >>"$smd"
  else
    site=""
    if ls "$callroot"/.whl/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fk-site \
        "$callroot"/.whl/*.whl >>"$out/bench_logs.txt" 2>&1 && site=/tmp/fk-site
    fi
    pyp="${site}${PYTHONPATH:+${site:+:}$PYTHONPATH}"
    if ! PYTHONPATH="$pyp" python3 -c 'import diffusers, peft, torch' >>"$out/bench_logs.txt" 2>&1; then
      echo "skipped: diffusers, peft or torch not importable (carry diffusers' wheels in .whl/: docs/side-by-side.md)" >>"$smd"
    else
      step "PyTorch training step (diffusers + PEFT)" | tee -a "$out/bench_logs.txt"
      tl=$(left)
      PYTHONPATH="$pyp" PYTHONUNBUFFERED=1 timeout "$tl" python3 torch_flux_lora_step.py --res 512,1024 --ckpt 1,0 \
        --warm "$warm" --steps "$steps" --budget $(( tl > 60 ? tl - 45 : 15 )) --out "$tmpd/torch_step.md" \
        >>"$out/bench_logs.txt" 2>&1
      torch_step_rc=$?
      if [ -s "$tmpd/torch_step.md" ]; then
        cat "$tmpd/torch_step.md" >>"$smd"
      else
        echo "failed: exit $torch_step_rc (no table; see bench_logs.txt)" >>"$smd"
      fi
    fi
  fi

  # The scaling grid (tools/scaling.sh): resolution at rank 32, rank at 1024², int8 base (or
  # FK_SCALING_BASE), checkpointing; the settings measured above are reused, not rerun. With no
  # time left it still writes every point (skipped: budget) with the plan's prediction.
  {
    echo
    echo "## Scaling grid (tools/scaling.sh)"
    echo
  } >>"$smd"
  if [ "${FK_SKIP_SCALING:-0}" = 1 ]; then
    echo "skipped: FK_SKIP_SCALING=1" >>"$smd"
  else
    step "scaling grid ($(left) s left)" | tee -a "$out/bench_logs.txt"
    costs=""
    for k in "${!cost[@]}"; do costs="$costs${costs:+,}$k=${cost[$k]}"; done
    tl=$(left)
    sb=$(( tl > 1 ? tl : 1 ))
    timeout $(( tl > 15 ? tl : 15 )) bash ./scaling.sh "$tmpd/scaling" --bin ./flux-kernels --base "${FK_SCALING_BASE:-int8}" \
      --gradient-checkpointing true --budget "$sb" --timeout "${FK_STEP_TIMEOUT:-240}" --reuse "$ejson" --cost "$costs" \
      --steps "$steps" --warmup "$warm" >>"$out/bench_logs.txt" 2>&1
    scaling_rc=$?
    cat "$tmpd/scaling/scaling.log" >>"$out/bench_logs.txt" 2>/dev/null
    # Raw JSON lines of the grid's own calls (the reused ones are in the log already).
    grep -vxF -f "$ejson" "$tmpd/scaling/scaling.jsonl" >>"$out/bench_logs.txt" 2>/dev/null
    if [ -s "$tmpd/scaling/scaling.md" ]; then
      cat "$tmpd/scaling/scaling.md" >>"$smd"
      echo >>"$smd"
      echo "CSV for tools/plot_scaling.py (it reads this file's csv block):" >>"$smd"
      echo >>"$smd"
      { echo '```csv'; cat "$tmpd/scaling/scaling.csv"; echo '```'; } >>"$smd"
    else
      echo "failed: exit $scaling_rc (no table; see bench_logs.txt)" >>"$smd"
    fi
  fi
  rm -rf "$tmpd"
fi

step "done"
{
  echo
  echo "# GPU check summary ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
  echo
  grep -h "^commit" BUILD_INFO 2>/dev/null
  echo "tests: $( [ $test_rc -eq 0 ] && echo PASS || echo FAIL )  sanitizer: $san_rc  bench exit: $bench_rc  attention bench: $attn_rc  torch: $torch_rc  mixed-LoRA batch: $mixed_rc  engine step: $eng_rc  torch step: $torch_step_rc  scaling: $scaling_rc  ($(( $(date +%s) - start )) s)"
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
  for t in attn_table.md step_table.md; do
    if [ -f "$out/$t" ]; then
      echo
      # The scaling CSV stays in step_table.md only.
      sed '/^```csv/,/^```$/d; /^CSV for tools\/plot_scaling.py/d' "$out/$t"
    fi
  done
} | tee "$out/summary.md"
