#!/usr/bin/env python3
"""Loads a LyCORIS file written by flux-kernels (`lora convert/merge --format kohya`, `train --adapter lokr`)
with lycoris-lora's own loader (`create_lycoris_from_weights`) on diffusers' FluxTransformer2DModel of the
tiny fixture, and compares the forward with a reference output.

LyCORIS on diffusers' model finds modules by `lycoris_<diffusers name>`; the engine writes a term that covers a
whole BFL module under `lora_unet_<BFL name>` (ComfyUI's kohya-style name), so this script renames those whose
BFL module is one diffusers module (to_out.0, ff.*, to_add_out, proj_out, x_embedder, context_embedder,
norm_out.linear with its rows put back in diffusers' [scale; shift] order) and refuses fused ones (qkv, linear1:
LyCORIS on diffusers' model has no such module). The point is LyCORIS's reading of the stored factors and alpha
(its scale rule), independent of the engine's loader.

Usage: .toolchain/lyco-venv/bin/python tools/check_lycoris_export.py FILE REFERENCE [TENSOR] [MULTIPLIER]
  REFERENCE: a safetensors file holding the expected output under TENSOR (default golden.out), e.g.
  tests/fixtures/lycoris-lokr-golden.safetensors for a `lora convert` of tests/fixtures/lycoris-lokr.safetensors.
Prints the relative L2 error; exits 1 above 1e-4.
"""
import os
import re
import sys

import torch
from diffusers import FluxTransformer2DModel
from lycoris import create_lycoris_from_weights
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import run_model  # noqa: E402

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")

DOUBLE = {"img_attn_proj": "attn.to_out.0", "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2",
          "txt_attn_proj": "attn.to_add_out", "txt_mlp_0": "ff_context.net.0.proj", "txt_mlp_2": "ff_context.net.2",
          "img_mod_lin": "norm1.linear", "txt_mod_lin": "norm1_context.linear"}
SINGLE = {"linear2": "proj_out", "modulation_lin": "norm.linear"}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer_linear": "proj_out",
       "final_layer_adaLN_modulation_1": "norm_out.linear"}


def diffusers_name(bfl):
    if bfl in TOP:
        return TOP[bfl]
    m = re.fullmatch(r"double_blocks_(\d+)_(.+)", bfl)
    if m and m.group(2) in DOUBLE:
        return f"transformer_blocks.{m.group(1)}.{DOUBLE[m.group(2)]}"
    m = re.fullmatch(r"single_blocks_(\d+)_(.+)", bfl)
    if m and m.group(2) in SINGLE:
        return f"single_transformer_blocks.{m.group(1)}.{SINGLE[m.group(2)]}"
    raise SystemExit(f"`lora_unet_{bfl}` is a fused BFL module with no single diffusers module: not checkable here")


def swap_rows(sd, name):
    """BFL's [shift; scale] rows of final_layer.adaLN_modulation.1 back to diffusers' [scale; shift]: ΔW's rows
    rotated by half, which is w1's rows (a even) or w2's (w1 of one row) for LoKr, both left factors for LoHa."""
    def rot(key):
        t = sd[key]
        sd[key] = torch.roll(t, t.shape[0] // 2, dims=0)
    if f"{name}.hada_w1_a" in sd:
        rot(f"{name}.hada_w1_a")
        rot(f"{name}.hada_w2_a")
        return
    w1 = sd.get(f"{name}.lokr_w1", sd.get(f"{name}.lokr_w1_a"))
    if w1.shape[0] % 2 == 0:
        rot(f"{name}.lokr_w1" if f"{name}.lokr_w1" in sd else f"{name}.lokr_w1_a")
    else:
        rot(f"{name}.lokr_w2" if f"{name}.lokr_w2" in sd else f"{name}.lokr_w2_a")


def main():
    path, ref = sys.argv[1], sys.argv[2]
    tensor = sys.argv[3] if len(sys.argv) > 3 else "golden.out"
    mult = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    sd = load_file(path)
    out = {}
    renamed = set()
    for k, v in sd.items():
        mod, part = k.split(".", 1)
        if mod.startswith("lora_unet_"):
            new = "lycoris_" + diffusers_name(mod[len("lora_unet_"):]).replace(".", "_")
            renamed.add((mod, new))
            mod = new
        out[f"{mod}.{part}"] = v.float()
    for old, new in renamed:
        if old == "lora_unet_final_layer_adaLN_modulation_1":
            swap_rows(out, new)
    m = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    net, _ = create_lycoris_from_weights(mult, "", m, weights_sd=out)
    modules = {k.split(".", 1)[0] for k in out}
    assert len(net.loras) == len(modules), f"LyCORIS loaded {len(net.loras)} of {len(modules)} modules"
    net.apply_to()
    got = run_model(m, inp)
    want = load_file(ref)[tensor]
    e = float((got - want).norm() / want.norm())
    print(f"{os.path.basename(path)}: LyCORIS's loader ({len(net.loras)} modules, multiplier {mult}) vs {tensor}: "
          f"rel L2 {e:.2e}")
    sys.exit(0 if e < 1e-4 else 1)


if __name__ == "__main__":
    main()
