#!/usr/bin/env python3
"""A PEFT DoRA LoRA (use_dora=True) on the tiny fixture model, its output and gradients through PEFT.

Writes, deterministically (fixed seed, CPU, float32):
  tests/fixtures/lora-peft-dora.safetensors  the adapter as diffusers saves it: `transformer.<module>.lora_A.weight`,
      `.lora_B.weight`, `.lora_magnitude_vector` (f32), metadata `lora_adapter_metadata` with use_dora = true,
      r = 4, lora_alpha = 8 (scale 2);
  tests/fixtures/lora-peft-dora-expected.safetensors  `out` [2,16,8]: PEFT's unmerged forward on tiny-inputs at
      strength 1, `out_half` at strength 0.5 (diffusers `set_adapters(weights=0.5)`: PEFT's scaling, inside the
      weight norm too), `loss` [1] = mean((out - target)^2) with tiny-grad-target's `target`, and `grad.<key>` =
      dL/d(every adapter tensor) by autograd through PEFT (which detaches the weight norm), under the file's keys.

Targets: diffusers' split q/k/v of both block kinds (rows of BFL's fused qkv / linear1), to_out.0, add_k_proj,
ff.net.2, proj_mlp, both proj_out's, x_embedder, a time embedder linear_1 and norm_out.linear (scale/shift rows
swapped against BFL). A, B and the magnitudes are random (magnitude = the initial weight norm times 1 + N(0, 0.2²))
so that every part of DoRA moves the output.

Run: tools/.venv/bin/python tools/make_dora_fixture.py   (venv as in tools/make_fixtures.py)
"""
import copy
import json
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import run_model  # noqa: E402

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2", "proj_mlp", "proj_out", "x_embedder",
           "timestep_embedder.linear_1", "norm_out.linear"]
R, ALPHA = 4, 8


def randomize(m, gen):
    """Moves every DoRA module's A, B and magnitude off PEFT's start (B = 0, m = ‖W‖) so that every part of DoRA
    moves the output: A ~ N(0, 1/in), B scaled so s·B·A is ~0.3 of W, m times 1 + N(0, 0.2²)."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoraLayer):
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.3 / ((ALPHA / R) * R ** 0.5))
                mag = mod.lora_magnitude_vector["default"].weight
                mag.mul_(1 + 0.2 * torch.randn(mag.shape, generator=gen))


def dora_leaves(m):
    """Every adapter tensor under the key PEFT saves it as (`transformer.<module>.lora_A.weight`, …)."""
    out = {}
    for name, p in m.named_parameters():
        for part, suffix in (("lora_A.weight", ".lora_A.default.weight"), ("lora_B.weight", ".lora_B.default.weight"),
                             ("lora_magnitude_vector", ".lora_magnitude_vector.default.weight")):
            if name.endswith(suffix):
                out[f"transformer.{name[: -len(suffix)]}.{part}"] = p
    return out


def loss_backward(m, leaves, inp, target):
    """mean((out - target)²) of the model on `inp`, its gradients into the `leaves` alone."""
    m.requires_grad_(False)
    for p in leaves.values():
        p.requires_grad_(True)
    y = m(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
          timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"],
          return_dict=False)[0]
    loss = ((y - target) ** 2).mean()
    loss.backward()
    return loss


def main():
    torch.manual_seed(1611)
    gen = torch.Generator().manual_seed(1611)
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    target = load_file(os.path.join(F, "tiny-grad-target.safetensors"))["target"]
    m = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), use_dora=True)
    m.add_adapter(copy.deepcopy(cfg))
    randomize(m, gen)
    m.eval()
    sd = {k: v.detach().clone().float().contiguous() for k, v in get_peft_model_state_dict(m).items()}
    assert any(k.endswith("lora_magnitude_vector") for k in sd), sorted(sd)[:6]
    assert len(sd) == 3 * sum(k.endswith(".lora_A.weight") for k in sd)
    meta = {f"transformer.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    save_file({f"transformer.{k}": v for k, v in sd.items()}, os.path.join(F, "lora-peft-dora.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True, default=str)})

    out = run_model(m, inp)
    m.set_adapters("default", weights=0.5)
    out_half = run_model(m, inp)
    m.set_adapters("default", weights=1.0)

    leaves = dora_leaves(m)
    assert set(leaves) == {f"transformer.{k}" for k in sd}, sorted(set(leaves) ^ {f"transformer.{k}" for k in sd})
    loss = loss_backward(m, leaves, inp, target)
    res = {"out": out, "out_half": out_half, "loss": loss.detach().reshape(1)}
    res.update({f"grad.{k}": p.grad.detach().clone() for k, p in leaves.items()})
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(F, "lora-peft-dora-expected.safetensors"))
    base = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    effect = float((run_model(base, inp) - out).norm() / out.norm())
    print(f"{len(sd) // 3} DoRA modules; effect vs base {effect:.3f}; loss {float(loss):.6f}")


if __name__ == "__main__":
    main()
