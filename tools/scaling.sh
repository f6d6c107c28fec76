#!/usr/bin/env bash
# Scaling grid for issue #6, item 4: step time and peak GPU memory of one full flux-kernels
# training step (forward, backward, AdamW; `flux-kernels bench-step`, random FLUX.1-dev weights,
# batch 1, 512 T5 tokens, attn-mlp targets) against resolution and against LoRA rank.
#
#   resolution ∈ {512, 768, 1024, 1536} at rank 32,
#   rank ∈ {4, 8, 16, 32, 64, 128} at 1024²        (1024² r 32 is run once, in both series),
#   int8 base and checkpointing on unless told otherwise.
#
# Each grid point is one `bench-step` call under `timeout`; a failure (out of memory, timeout,
# no JSON) is recorded in its row and the grid goes on. Writes into OUTDIR:
#   scaling.csv    size,rank,base,checkpointing,step_s_median,peak_gib,predicted_gib,status
#   scaling.md     the same as two markdown tables (vs resolution, vs rank)
#   scaling.jsonl  the raw JSON line of every successful call
#   scaling.log    each call's command line, exit status and stderr
# predicted_gib is the JSON's predicted_allocated_gib (the plan less the CUDA context and cuBLAS
# workspace, comparable with peak_gib, the memory pool's high-water mark); for a failed or
# skipped point it comes from `flux-kernels plan` less the same 0.53 GiB
# (no GPU needed), so the figure can draw the prediction at every point.
# tools/plot_scaling.py OUTDIR/scaling.csv draws docs/scaling.svg from the CSV.
#
# Usage (any CUDA machine with the release binary built with nvcc):
#   tools/scaling.sh OUTDIR [--base int8|bf16] [--gradient-checkpointing true|false] [--bin PATH]
#                    [--timeout S] [--budget S] [--reuse FILE.jsonl] [--steps N] [--warmup N]
#                    [--cost SIZE=S,...]
#   --gradient-checkpointing  true (default) or false (--checkpointing, the old name, still works)
#   --bin      the flux-kernels binary (default: $FLUX_KERNELS, ./flux-kernels beside this
#              script (the GPU-check pack), target/release/flux-kernels, then PATH)
#   --timeout  seconds per grid point (default 300)
#   --budget   seconds for the whole grid: a point whose estimated cost (40 s at 512², 50 s at
#              768², 60 s at 1024², 90 s at 1536², or the longest measured call at that size if
#              longer) no longer fits is written as `skipped: budget` (default: no limit)
#   --cost     other cost estimates for --budget, e.g. 1024=90,1536=140 (seconds per call)
#   --reuse    JSON lines from earlier bench-step calls (same contract); a grid point with a
#              matching line (size, rank, base, checkpointing, attn-mlp) is taken from it, not rerun
set -euo pipefail

usage() { sed -n '/^# Usage/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] || usage
case "$1" in -h|--help|-*) usage ;; esac
outdir=$1
shift
base=int8
ckpt=true
bin=${FLUX_KERNELS:-}
per_timeout=300
budget=0
reuse=""
costs=""
steps=3
warmup=1
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base=${2:?--base needs a value}; shift 2 ;;
    --gradient-checkpointing|--checkpointing) ckpt=${2:?$1 needs a value}; shift 2 ;;
    --bin) bin=${2:?--bin needs a value}; shift 2 ;;
    --timeout) per_timeout=${2:?--timeout needs a value}; shift 2 ;;
    --budget) budget=${2:?--budget needs a value}; shift 2 ;;
    --reuse) reuse=${2:?--reuse needs a value}; shift 2 ;;
    --steps) steps=${2:?--steps needs a value}; shift 2 ;;
    --warmup) warmup=${2:?--warmup needs a value}; shift 2 ;;
    --cost) costs=${2:?--cost needs a value}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "scaling.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
case "$base" in int8|bf16|fp8|fp8-scaled) ;; *) echo "scaling.sh: --base takes int8, bf16, fp8 or fp8-scaled" >&2; exit 2 ;; esac
case "$ckpt" in true|on) ckpt=true; ck_flag=--gradient-checkpointing ;; false|off) ckpt=false; ck_flag=--no-gradient-checkpointing ;;
  *) echo "scaling.sh: --gradient-checkpointing takes true or false" >&2; exit 2 ;; esac
for n in "$per_timeout" "$budget" "$steps" "$warmup"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "scaling.sh: '$n' is not a whole number of seconds/steps" >&2; exit 2; }
done

here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$bin" ]; then
  for c in "$here/flux-kernels" "$here/../target/release/flux-kernels" "$(command -v flux-kernels || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && bin=$c && break
  done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "scaling.sh: no flux-kernels binary (build it: cargo build --release, or pass --bin)" >&2; exit 2; }
[ -z "$reuse" ] || [ -r "$reuse" ] || { echo "scaling.sh: --reuse $reuse is not readable" >&2; exit 2; }

mkdir -p "$outdir"
csv=$outdir/scaling.csv
md=$outdir/scaling.md
jsonl=$outdir/scaling.jsonl
log=$outdir/scaling.log
echo "size,rank,base,checkpointing,step_s_median,peak_gib,predicted_gib,status" >"$csv"
: >"$jsonl"
: >"$log"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

# A number from flat JSON ("key":value); empty when absent.
jget() { sed -nE "s/.*\"$1\"[[:space:]]*:[[:space:]]*(-?[0-9][0-9.eE+-]*).*/\1/p" <<<"$2" | head -1; }
# One field for the CSV and the markdown table: no commas, quotes, pipes or newlines, short.
clean() { tr '\n,|"' " ;/'" <<<"$1" | sed -E 's/[[:space:]]+/ /g; s/^ //; s/ $//' | cut -c1-140; }
# A matching line of --reuse (any key order), or nothing.
reused() {
  [ -n "$reuse" ] || return 0
  grep -E "\"size\"[[:space:]]*:[[:space:]]*$1[,}]" "$reuse" |
    grep -E "\"rank\"[[:space:]]*:[[:space:]]*$2[,}]" |
    grep -E "\"base\"[[:space:]]*:[[:space:]]*\"$base\"" |
    grep -E "\"checkpointing\"[[:space:]]*:[[:space:]]*$ckpt[,}]" |
    grep -E "\"targets\"[[:space:]]*:[[:space:]]*\"attn-mlp\"" |
    grep -vE '"kernels"[[:space:]]*:[[:space:]]*"sm80"' |
    grep -E '"step_s_median"' | tail -1 || true
}
predicted() {
  "$bin" plan --model flux1-dev --resolution "$1" --rank "$2" --targets attn-mlp --base "$base" \
    "$ck_flag" 2>/dev/null | sed -nE 's/.*total on the GPU \(predicted\) +([0-9.]+) GiB.*/\1/p' | head -1 |
    awk '{ printf "%.2f\n", $1 - 0.53125 }' || true  # less the context and cuBLAS workspace, as above
}
declare -A est=([512]=40 [768]=50 [1024]=60 [1536]=90)
for kv in ${costs//,/ }; do
  [[ "$kv" =~ ^([0-9]+)=([0-9]+)$ ]] || { echo "scaling.sh: --cost takes SIZE=SECONDS,…, got '$kv'" >&2; exit 2; }
  est[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
cost() { echo "${est[$1]:-$(( 60 * $1 * $1 / (1024 * 1024) + 30 ))}"; }

# Priority order (so a cut budget still leaves points on both curves): the shared 1024² r 32
# point, then the resolution ends, then the rank ends, then the rest.
grid="1024:32 512:32 1536:32 1024:4 1024:128 768:32 1024:16 1024:64 1024:8"
declare -A row
for point in $grid; do
  size=${point%:*}
  rank=${point#*:}
  step=""; peak=""; pred=""; status=""
  line=$(reused "$size" "$rank")
  if [ -n "$line" ]; then
    status="ok (reused)"
  else
    left=$(( budget - ($(date +%s) - start) ))
    if [ "$budget" -gt 0 ] && [ "$left" -lt "$(cost "$size")" ]; then
      status="skipped: budget"
    else
      t=$per_timeout
      [ "$budget" -gt 0 ] && [ "$left" -lt "$t" ] && t=$left
      cmd=("$bin" bench-step --model random:flux1-dev --resolution "$size" --rank "$rank" --targets attn-mlp
           --base "$base" "$ck_flag" --steps "$steps" --warmup "$warmup" --json)
      echo "== $(date -u +%H:%M:%S) ${cmd[*]} (timeout ${t} s)" >>"$log"
      t0=$(date +%s)
      rc=0
      timeout "$t" "${cmd[@]}" >"$tmp/stdout" 2>"$tmp/stderr" || rc=$?
      wall=$(( $(date +%s) - t0 ))
      cat "$tmp/stderr" >>"$log"
      echo "exit $rc after ${wall} s" >>"$log"
      [ "$wall" -gt "$(cost "$size")" ] && est[$size]=$wall
      line=$(grep -E '^[[:space:]]*\{' "$tmp/stdout" | tail -1 || true)
      if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="timeout: ${t} s"
      elif [ "$rc" -ne 0 ]; then
        # The error line: the last one that says error / panicked / out of memory, else the last line.
        msg=$(grep -iE 'error|panicked|out of memory' "$tmp/stderr" | tail -1 || true)
        [ -n "$msg" ] || msg=$(grep -v '^[[:space:]]*$' "$tmp/stderr" | tail -1 || true)
        status="failed: exit $rc: $(clean "${msg:-no message}")"
      elif [ -z "$line" ]; then
        status="failed: no JSON line on stdout"
      else
        status=ok
      fi
      [ "$status" = ok ] || line=""
    fi
  fi
  if [ -n "$line" ]; then
    echo "$line" >>"$jsonl"
    step=$(jget step_s_median "$line")
    peak=$(jget peak_gib "$line")
    # The plan without the CUDA context and cuBLAS workspace: what peak_gib (the pool's
    # high-water mark of allocated bytes) measures.
    pred=$(jget predicted_allocated_gib "$line")
  fi
  [ -n "$pred" ] || pred=$(predicted "$size" "$rank")
  echo "$size,$rank,$base,$ckpt,$step,$peak,$pred,$status" >>"$csv"
  row[$point]="| ${size}² | $rank | $base | $ckpt | ${step:--} | ${peak:--} | ${pred:--} | $status |"
  echo "scaling: ${size}² r $rank: ${step:--} s, ${peak:--} GiB (predicted ${pred:--}): $status" >&2
done

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
{
  echo "flux-kernels bench-step, random FLUX.1-dev weights, $base base, checkpointing $ckpt, attn-mlp" \
       "targets, batch 1, 512 T5 tokens; step time is the median of $steps steps after $warmup warm-up;" \
       "peak is the engine's measured peak GPU memory; predicted is \`flux-kernels plan\`" \
       "($(date -u +%Y-%m-%d)${gpu:+, $gpu})."
  echo
  hdr="| step (s, median) | peak (GiB, measured) | predicted by plan (GiB) | status |"
  echo "### Against resolution (rank 32)"
  echo
  echo "| resolution | rank | base | checkpointing $hdr"
  echo "|---|---|---|---|---|---|---|---|"
  for s in 512 768 1024 1536; do echo "${row[$s:32]}"; done
  echo
  echo "### Against rank (1024²)"
  echo
  echo "| resolution | rank | base | checkpointing $hdr"
  echo "|---|---|---|---|---|---|---|---|"
  for r in 4 8 16 32 64 128; do echo "${row[1024:$r]}"; done
} >"$md"
echo "scaling: wrote $csv, $md ($(( $(date +%s) - start )) s)" >&2
