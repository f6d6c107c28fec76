#!/usr/bin/env python3
"""Checks that LoRAs trained by flux-kernels load in diffusers with the effect the engine computes.

tools/make_trained_fixture.sh trains tests/fixtures/trained-{peft,kohya}.safetensors on the tiny
fixture model and records the engine's `forward --lora` output beside each. This script:
  - PEFT file: loads it with diffusers' own `load_lora_adapter` (reading `lora_adapter_metadata`)
    into FluxTransformer2DModel and compares the output with the engine's: relative L2 < 1e-4;
  - kohya file: diffusers' kohya importer assumes FLUX's real width (3072), so at the tiny width
    the check merges W += (alpha/r)·up·down into the BFL-layout weights, as ComfyUI applies it,
    converts to diffusers and compares the same way.
Exit status 1 on any mismatch.

Run: tools/.venv/bin/python tools/check_trained_lora.py   (venv as in tools/make_fixtures.py)
"""
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import bfl_to_diffusers, diffusers_to_bfl, rel_l2, run_model  # noqa: E402

F = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def main():
    ddir = os.path.join(F, "tiny-diffusers")
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    ok = True

    m = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
    m.load_lora_adapter(F, weight_name="trained-peft.safetensors", prefix="transformer", adapter_name="trained")
    want = load_file(os.path.join(F, "trained-peft-expected.safetensors"))["out"]
    err = rel_l2(run_model(m, inp), want)
    base = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
    effect = rel_l2(run_model(base, inp), want)
    print(f"trained-peft: diffusers load_lora_adapter vs engine forward --lora: rel L2 {err:.3e} "
          f"(LoRA effect vs base {effect:.3f})")
    ok &= err < 1e-4 and effect > 1e-3

    cfg = base.config
    sd = diffusers_to_bfl({k: v.clone() for k, v in base.state_dict().items()}, cfg.num_layers, cfg.num_single_layers)
    lora = load_file(os.path.join(F, "trained-kohya.safetensors"))
    for k in [k for k in lora if k.endswith(".lora_down.weight")]:
        mod = k[len("lora_unet_"):-len(".lora_down.weight")]
        target = next(n[:-len(".weight")] for n in sd if n.endswith(".weight") and n[:-len(".weight")].replace(".", "_") == mod)
        down, up = lora[k].float(), lora[k.replace("lora_down", "lora_up")].float()
        alpha = float(lora[k.replace(".lora_down.weight", ".alpha")])
        sd[f"{target}.weight"] = sd[f"{target}.weight"] + (alpha / down.shape[0]) * up @ down
    merged = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
    merged.load_state_dict(bfl_to_diffusers(sd, cfg.num_layers, cfg.num_single_layers), strict=True)
    want = load_file(os.path.join(F, "trained-kohya-expected.safetensors"))["out"]
    err = rel_l2(run_model(merged, inp), want)
    print(f"trained-kohya: merged as ComfyUI applies it vs engine forward --lora: rel L2 {err:.3e}")
    ok &= err < 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
