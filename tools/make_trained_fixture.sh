#!/usr/bin/env bash
# Trains a small LoRA with this engine on the tiny fixture model and records the engine's own
# forward output with it; tools/check_trained_lora.py then loads the LoRA in diffusers + PEFT and
# checks diffusers computes the same output (< 1e-4 relative L2).
#
# Usage: tools/make_trained_fixture.sh [BINARY]   (default: target/release/flux-kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/flux-kernels}
F=tests/fixtures
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$bin" synth-data --model $F/tiny-diffusers --out "$tmp/data" --n 6 --size 8 --n-txt 5 --seed 3
for fmt in peft kohya; do
  "$bin" train --model $F/tiny-diffusers --data "$tmp/data" --steps 20 --rank 4 --alpha 8 --lr 1e-2 \
    --targets all,x_embedder,norm_out.linear,proj_out,linear_1 --include-modulation \
    --batch-size 2 --save-dtype f32 --format $fmt --seed 5 --out "$F/trained-$fmt.safetensors" --log-every 10
  "$bin" forward --model $F/tiny-diffusers --inputs $F/tiny-inputs.safetensors \
    --lora "$F/trained-$fmt.safetensors" --out "$F/trained-$fmt-expected.safetensors"
done
