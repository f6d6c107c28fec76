#!/usr/bin/env python3
"""Golden values for DoRA *training* (`train --adapter dora`) on the tiny fixture model, from PEFT.

PEFT `LoraConfig(use_dora=True)` on diffusers' FluxTransformer2DModel (tests/fixtures/tiny-diffusers), float32,
CPU, fixed seed. Writes tests/fixtures/dora-train-golden.safetensors with, under PEFT's own keys
(`transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`):
  init.<key>   the magnitudes PEFT starts from (‖W + s·B·A‖ per output row with B = 0, i.e. ‖W‖): what the
               engine's initialisation must reproduce;
  param.<key>  every adapter tensor after moving A, B and the magnitudes off their initial values (random), so
               that the rescale g = m / ‖W + s·B·A‖ is not 1 and every part of DoRA moves the output;
  out          PEFT's forward on tests/fixtures/tiny-inputs.safetensors with those parameters (no dropout);
  loss         [1] mean((out − target)²) with tests/fixtures/tiny-grad-target.safetensors' `target`;
  grad.<key>   d loss / d(every adapter tensor) by PyTorch autograd through PEFT (which detaches the norm).
The inputs are the committed tiny-inputs / tiny-grad-target files; the targets are given as the trainer's
--targets takes them (PEFT's suffix rule): split q/k/v of both block kinds, add_v_proj, to_out.0, ff.net.0.proj,
proj_mlp, both proj_out's, norm_out.linear (rows swapped against BFL), x_embedder and context_embedder.
rank 4, alpha 8 (scale 2).

Run: .toolchain/torch-venv/bin/python tools/make_dora_train_fixture.py   (torch, diffusers, peft, safetensors)
"""
import copy
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_dora_fixture import ALPHA, R, dora_leaves, loss_backward, randomize  # noqa: E402
from make_fixtures import run_model  # noqa: E402

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
# Keep in step with TARGETS in tests/dora_train.rs.
TARGETS = ["to_q", "to_k", "to_v", "add_v_proj", "to_out.0", "ff.net.0.proj", "proj_mlp", "proj_out",
           "norm_out.linear", "x_embedder", "context_embedder"]


def main():
    torch.manual_seed(1616)
    gen = torch.Generator().manual_seed(1616)
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    target = load_file(os.path.join(F, "tiny-grad-target.safetensors"))["target"]
    m = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    m.add_adapter(copy.deepcopy(LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), use_dora=True)))
    params = dora_leaves(m)
    res = {f"init.{k}": p.detach().clone() for k, p in params.items() if k.endswith("lora_magnitude_vector")}
    randomize(m, gen)
    res.update({f"param.{k}": p.detach().clone() for k, p in params.items()})
    res["out"] = run_model(m, inp)
    res["loss"] = loss_backward(m, params, inp, target).detach().reshape(1)
    res.update({f"grad.{k}": p.grad.detach().clone() for k, p in params.items()})
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(F, "dora-train-golden.safetensors"))
    base = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    effect = float((run_model(base, inp) - res["out"]).norm() / res["out"].norm())
    loss = float(res["loss"])
    print(f"{len(params) // 3} DoRA modules; effect vs base {effect:.3f}; loss {loss:.6f}")


if __name__ == "__main__":
    main()
