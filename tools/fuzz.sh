#!/usr/bin/env bash
# Fuzzes every target of tools/fuzz/targets.rs (safetensors reader, LoRA keys, model files,
# config.json, index.json, TOML configs, spiece.model, tokenizer.json, image + caption folders)
# with the release build of fk-fuzz, and prints a table of executions per target.
#
# Usage: tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET …]      (default 60 s, every target)
#   FUZZ_OUT=dir (default target/fuzz) keeps the corpus of crashes under crashes/<target>/;
#   FUZZ_PROFILE=dev fuzzes the debug build (CI: no release build there);
#   FUZZ_EXECS=N stops each target after N executions (the budget still caps it).
# A process that aborts (allocation over the limit, an input past the timeout) is restarted until
# the budget is spent; its input is saved as a crash. Exit status 1 when any crash was found.
# Copy crash inputs into tests/fuzz-crashes/<target>/ once fixed: tests/fuzz_regressions.rs
# replays them on every `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
tdir=${CARGO_TARGET_DIR:-target}
out=${FUZZ_OUT:-$tdir/fuzz}
profile=${FUZZ_PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --bin fk-fuzz || exit 2
  bin=$tdir/release/fk-fuzz
else
  cargo build --bin fk-fuzz || exit 2
  bin=$tdir/debug/fk-fuzz
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("$bin" --list)
mkdir -p "$out"
summary="$out/summary.tsv"
: > "$summary"
crashed=0
for t in "${targets[@]}"; do
  start=$(date +%s)
  execs=0; outcomes=0; corpus=0; aborts=0; seed=1
  while :; do
    left=$(( secs - ($(date +%s) - start) ))
    [ "$left" -gt 0 ] || break
    line=$("$bin" "$t" --seconds "$left" --seed "$seed" --out "$out" ${FUZZ_EXECS:+--execs "$((FUZZ_EXECS - execs))"} | tail -n 1)
    rc=$?
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
      aborts=$((aborts + 1))   # aborted: its input is saved as a crash at the next start
      seed=$((seed + 1))
      # Each aborted process's executions are lost to the count; the crash is what matters.
      continue
    fi
    IFS=$'\t' read -r _ n _ _ o c _ <<< "$line"
    execs=$((execs + n)); outcomes=$o; corpus=$c
    break
  done
  # Collect the input of a final abort.
  "$bin" "$t" --execs 0 --out "$out" > /dev/null 2>&1
  ncrash=$(find "$out/crashes/$t" -name '*.bin' 2>/dev/null | wc -l)
  [ "$ncrash" -eq 0 ] || crashed=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$execs" "$(( $(date +%s) - start ))" "$outcomes" "$aborts" "$ncrash" | tee -a "$summary"
done
echo
echo "| target | executions | seconds | distinct outcomes | aborted processes | crash inputs |"
echo "|---|---:|---:|---:|---:|---:|"
while IFS=$'\t' read -r t n s o a c; do echo "| $t | $n | $s | $o | $a | $c |"; done < "$summary"
exit $crashed
