#!/usr/bin/env python3
"""Loads LoRAs this engine trains with real diffusers and checks they act as the engine says.

Issue 16 §1: a trained LoRA must have the same effect wherever it is loaded. The CI test
(tests/loader_rules.rs, no Python) applies each loader's documented scaling rule in Rust; this
script checks the two diffusers paths with diffusers itself, on the tiny fixture model:

  - `FluxPipeline.load_lora_weights(file)`: reads `lora_adapter_metadata` (the LoraConfig);
  - `transformer.load_lora_adapter(file)` with a plain file path: the metadata is not read
    (`_fetch_state_dict` takes the non-safetensors branch for a path without `weight_name`), so
    PEFT builds the adapter with alpha = rank.

For each training run (alpha 8 on rank 4; rsLoRA with rank and alpha patterns and a fused BFL
target; the top-level linears alone; DoRA, `--adapter dora`) it trains with the engine (PEFT
format, bf16 as the default), records the engine's `forward --lora` output, loads the file both
ways and compares: relative L2 < 1e-4 each.
Exit status 1 on any mismatch.

Run (venv as in tools/make_fixtures.py; tools/.venv is git-ignored):
  cargo build && tools/.venv/bin/python tools/check_loader_agreement.py [--bin PATH]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import rel_l2, run_model  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
F = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(F, "tiny-diffusers")

RUNS = {
    "alpha8": ["--rank", "4", "--alpha", "8", "--targets", "all,x_embedder,norm_out.linear,proj_out,linear_1",
               "--include-modulation"],
    "rslora": ["--rank", "4", "--alpha", "6", "--rslora", "--rank-pattern", "to_q=2,linear2=8",
               "--alpha-pattern", "to_k=3,txt_attn.qkv=12",
               "--targets", "to_q,to_k,to_v,to_out.0,ff.net.0.proj,txt_attn.qkv,linear2"],
    # The top-level linears alone (issue 16 §2): x_embedder, context_embedder, and the final linear by its
    # BFL name (written as diffusers' proj_out).
    "top-level": ["--rank", "4", "--alpha", "8", "--targets", "x_embedder,context_embedder,final_layer.linear"],
    # DoRA (issue 16 §2): lora_magnitude_vector and use_dora; a fused BFL target split into add_q/k/v,
    # top-level linears, norm_out.linear's swapped rows.
    "dora": ["--adapter", "dora", "--rank", "4", "--alpha", "8",
             "--targets", "to_q,to_k,to_v,to_out.0,ff.net.0.proj,proj_mlp,proj_out,txt_attn.qkv,x_embedder,"
                          "context_embedder,norm_out.linear"],
}


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def fresh():
    return FluxTransformer2DModel.from_pretrained(MODEL, torch_dtype=torch.float32).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                   "debug", "flux-kernels"))
    a = ap.parse_args()
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    base = run_model(fresh(), inp)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        sh(a.bin, "synth-data", "--model", MODEL, "--out", data, "--n", 6, "--size", 8, "--n-txt", 5, "--seed", 3)
        for name, flags in RUNS.items():
            lora = os.path.join(tmp, f"{name}.safetensors")
            sh(a.bin, "train", "--model", MODEL, "--data", data, "--steps", 10, "--lr", "1e-2", "--batch-size", 2,
               "--seed", 5, "--format", "peft", "--device", "cpu", "--out", lora, *flags)
            out = os.path.join(tmp, f"{name}-engine.safetensors")
            sh(a.bin, "forward", "--model", MODEL, "--inputs", os.path.join(F, "tiny-inputs.safetensors"),
               "--lora", lora, "--out", out)
            want = load_file(out)["out"]
            effect = rel_l2(base, want)

            # FluxPipeline.load_lora_weights: a pipeline around the transformer alone is enough.
            pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                tokenizer_2=None, transformer=fresh())
            pipe.load_lora_weights(lora, adapter_name="a")
            e_weights = rel_l2(run_model(pipe.transformer, inp), want)

            # transformer.load_lora_adapter(path): the metadata is not read.
            m = fresh()
            m.load_lora_adapter(lora, adapter_name="a")
            e_adapter = rel_l2(run_model(m, inp), want)

            print(f"{name}: LoRA effect vs base {effect:.3f}; diffusers load_lora_weights rel L2 {e_weights:.2e}; "
                  f"load_lora_adapter(file) rel L2 {e_adapter:.2e}")
            ok &= effect > 1e-3 and e_weights < 1e-4 and e_adapter < 1e-4
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
