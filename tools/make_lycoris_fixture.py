#!/usr/bin/env python3
"""Golden values for LyCORIS LoKr and LoHa on the tiny fixture model, from the `lycoris-lora` package.

LyCORIS's own `LokrModule` / `LohaModule` wrap linears of diffusers' FluxTransformer2DModel
(tests/fixtures/tiny-diffusers), float32, CPU, fixed seed. For each kind a file
tests/fixtures/lycoris-<kind>.safetensors holds, under the keys LyCORIS saves (SimpleTuner's
`lycoris_<diffusers module, dots as underscores>.<lokr_w1 | lokr_w2_a | … | hada_w1_a | … | alpha>`,
what ComfyUI maps for FLUX):
  <key>        every adapter tensor (the factors moved off LyCORIS's initialisation, random, so that each
               moves the output) and each module's `alpha` as LyCORIS's `custom_state_dict` writes it;
and tests/fixtures/lycoris-<kind>-golden.safetensors:
  golden.out   the forward on tests/fixtures/tiny-inputs.safetensors with the adapters at multiplier 1;
  golden.out_m the forward at multiplier MULT (LyCORIS's strength);
  golden.loss  [1] mean((out − target)²) with tests/fixtures/tiny-grad-target.safetensors' `target`;
  golden.grad.<key>  d loss / d(every factor) by PyTorch autograd through the LyCORIS modules.

The LoKr golden's metadata `train_shapes` (JSON) holds, for the trainer's check, what LyCORIS's
`LokrModule(lora_dim=4, alpha=8, factor=F)` builds on each of TRAIN_TARGETS for F in 4 and -1: every
parameter's shape, its initial values' statistics (w1/w2_a nonzero, w2_b or a whole w2 zero) and its scale.

The modules and settings are chosen to cover every case of the loaders: LoKr with a full w1 and a low-rank w2
(LyCORIS's default), both factored (`decompose_both`), both full (`full_matrix`: scale forced to 1), an explicit
`factor`, a module whose rows are a slice of a fused BFL linear (to_q, to_k, add_k_proj, single-block to_v,
proj_mlp), norm_out.linear (rows swapped against BFL), the top-level x_embedder / context_embedder; LoHa on
similar modules with different ranks and alphas.

Run: .toolchain/lyco-venv/bin/python tools/make_lycoris_fixture.py
(torch, diffusers, safetensors, lycoris-lora 4.1.3; see docs/adapters.md §5 for the venv)
"""
import json
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import run_model  # noqa: E402

F = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MULT = 0.6

# (diffusers module, LokrModule keyword arguments). Keep in step with tests/lycoris.rs.
LOKR = [
    ("transformer_blocks.0.attn.to_q", dict(lora_dim=2, alpha=3.0, factor=4)),
    ("transformer_blocks.0.attn.to_k", dict(lora_dim=1, alpha=2.0, factor=4, decompose_both=True)),
    ("transformer_blocks.1.attn.add_k_proj", dict(lora_dim=2, alpha=1.0, factor=-1)),
    ("transformer_blocks.1.ff.net.0.proj", dict(lora_dim=4, alpha=8.0, factor=-1)),
    ("transformer_blocks.0.attn.to_out.0", dict(lora_dim=4, alpha=5.0, factor=2, full_matrix=True)),
    ("single_transformer_blocks.0.attn.to_v", dict(lora_dim=2, alpha=4.0, factor=8)),
    ("single_transformer_blocks.1.proj_mlp", dict(lora_dim=3, alpha=6.0, factor=4)),
    ("single_transformer_blocks.1.proj_out", dict(lora_dim=2, alpha=2.0, factor=-1)),
    ("norm_out.linear", dict(lora_dim=2, alpha=2.0, factor=4)),
    ("x_embedder", dict(lora_dim=1, alpha=1.0, factor=2)),
    ("context_embedder", dict(lora_dim=2, alpha=3.0, factor=4)),
]
LOHA = [
    ("transformer_blocks.0.attn.to_q", dict(lora_dim=2, alpha=3.0)),
    ("transformer_blocks.1.attn.add_k_proj", dict(lora_dim=4, alpha=4.0)),
    ("transformer_blocks.0.ff_context.net.2", dict(lora_dim=3, alpha=1.5)),
    ("single_transformer_blocks.0.proj_mlp", dict(lora_dim=2, alpha=1.0)),
    ("single_transformer_blocks.1.proj_out", dict(lora_dim=4, alpha=2.0)),
    ("norm_out.linear", dict(lora_dim=2, alpha=2.0)),
    ("context_embedder", dict(lora_dim=1, alpha=1.0)),
]


# Keep in step with tests/lokr_train.rs.
TRAIN_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.0.proj",
                 "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.proj_mlp",
                 "single_transformer_blocks.1.proj_out", "norm_out.linear", "x_embedder", "context_embedder"]


def train_shapes():
    m = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32)
    mods = dict(m.named_modules())
    out = {}
    for factor in (4, -1):
        for name in TRAIN_TARGETS:
            lm = LokrModule("x", mods[name], lora_dim=4, alpha=8.0, factor=factor)
            params = {k: {"shape": list(p.shape), "zero": bool((p == 0).all())}
                      for k, p in lm.named_parameters(recurse=False)}
            out[f"{name}|{factor}"] = {"params": params, "scale": float(lm.scale)}
    return out


def wrap(m, cls, specs):
    mods = dict(m.named_modules())
    out = []
    for name, kw in specs:
        lm = cls("lycoris_" + name.replace(".", "_"), mods[name], multiplier=1.0, **kw)
        lm.apply_to()
        out.append(lm)
    return out


def leaves(mods):
    """Every trainable factor under the key LyCORIS saves it as (`<lora_name>.<factor>`)."""
    out = {}
    for lm in mods:
        for k, p in lm.named_parameters(recurse=False):
            out[f"{lm.lora_name}.{k}"] = p
    return out


def randomize(params, gen):
    """Every factor ~ N(0, σ²) with σ such that the module's ΔW is a sizeable fraction of the weights."""
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.35)


def forward_loss(m, inp, target):
    y = m(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
          timestep=inp["timesteps"], img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"],
          return_dict=False)[0]
    return ((y - target) ** 2).mean()


def make(kind, cls, specs, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    inp = load_file(os.path.join(F, "tiny-inputs.safetensors"))
    target = load_file(os.path.join(F, "tiny-grad-target.safetensors"))["target"]
    m = FluxTransformer2DModel.from_pretrained(os.path.join(F, "tiny-diffusers"), torch_dtype=torch.float32).eval()
    base = run_model(m, inp)
    mods = wrap(m, cls, specs)
    params = leaves(mods)
    randomize(params, gen)
    res = {}
    for lm in mods:
        for k, v in lm.custom_state_dict().items():
            res[f"{lm.lora_name}.{k}"] = v.detach().clone().float().reshape(v.shape)
    res["golden.out"] = run_model(m, inp)
    for lm in mods:
        lm.multiplier = MULT
    res["golden.out_m"] = run_model(m, inp)
    for lm in mods:
        lm.multiplier = 1.0
    m.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    loss = forward_loss(m, inp, target)
    loss.backward()
    res["golden.loss"] = loss.detach().reshape(1)
    res.update({f"golden.grad.{k}": p.grad.detach().clone() for k, p in params.items()})
    path = os.path.join(F, f"lycoris-{kind}.safetensors")
    adapters = {k: v.contiguous() for k, v in res.items() if not k.startswith("golden.")}
    save_file(adapters, path, metadata={"format": "pt", "lycoris.algo": kind})
    golden = {k: v.contiguous() for k, v in res.items() if k.startswith("golden.")}
    meta = {"train_shapes": json.dumps(train_shapes())} if kind == "lokr" else None
    save_file(golden, os.path.join(F, f"lycoris-{kind}-golden.safetensors"), metadata=meta)
    effect = float((base - res["golden.out"]).norm() / res["golden.out"].norm())
    shapes = {k: tuple(v.shape) for k, v in res.items() if not k.startswith("golden.")}
    print(f"{kind}: {len(mods)} modules, effect vs base {effect:.3f}, loss {loss.item():.6f}, "
          f"{os.path.getsize(path)} bytes")
    for k, s in shapes.items():
        print(f"  {k} {s}")


def main():
    make("lokr", LokrModule, LOKR, 1617)
    make("loha", LohaModule, LOHA, 1618)


if __name__ == "__main__":
    main()
