#!/usr/bin/env python3
"""Golden-fixture generator for flux-kernels (tests/fixtures/).

Builds a tiny random FLUX.1-dev-shaped transformer with diffusers' own `FluxTransformer2DModel`, writes its
weights in the diffusers (sharded) and the original BFL layouts, writes fixed inputs, five LoRA files in five
on-disk conventions (diffusers/PEFT with and without metadata, kohya sd-scripts, ComfyUI-native, OneTrainer),
the reference outputs of the model with and without each LoRA (and a stack of three), all computed in
float32 on the CPU, and golden LoRA gradients: dL/d(every LoRA factor) of L = mean((out - target)^2) for the
PEFT, kohya and OneTrainer files (written last, from their own seeded generator, so the files above do not
depend on them).

Regenerate (from the repository root, on any machine with Python >= 3.10; no GPU needed):

    python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements-fixtures.txt && tools/.venv/bin/python tools/make_fixtures.py

Optional: `--out DIR` writes somewhere else than tests/fixtures/ (used to check determinism).

Conventions (see docs/flux-model.md §2-4 and docs/lora-formats.md §3):
  * Every model parameter is rounded to bf16 before use, so the bf16 checkpoints hold exactly the weights the
    reference outputs were computed with.
  * LoRA delta of one module: dW = multiplier * (alpha / r) * B @ A   (B = lora_B = lora_up [out, r],
    A = lora_A = lora_down [r, in]).
  * PEFT references are computed by PEFT itself (unmerged LoRA layers); kohya / ComfyUI references by merging
    the delta into the BFL-layout weights and converting to diffusers; OneTrainer by merging into the diffusers
    weights. The merge route is validated against PEFT inside this script.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import struct
import sys

import numpy as np
import torch

SEED = 20241128
GRAD_SEED = SEED + 1  # tiny-grad-target.safetensors (own generator, drawn after everything else)
FD_SEED = SEED + 2  # which elements the finite-difference check of the gradients perturbs (not stored)

# ----------------------------------------------------------------------------------------------------------
# Model configuration (hidden = 2*16 = 32, MLP = 128, 2 double + 2 single blocks)
# ----------------------------------------------------------------------------------------------------------
MODEL_CONFIG = dict(
    patch_size=1,
    in_channels=8,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

PEFT_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
    "context_embedder", "linear_1", "linear_2",
]
PEFT_NOMETA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]

# LoRA random init (both factors non-zero): A ~ N(0, 1/in_features), B ~ N(0, (LORA_REL / (s * sqrt(r)))^2)
# with s = alpha/r, so each module's delta s*B@A has entries of std ~ LORA_REL / sqrt(in_features), i.e.
# ~LORA_REL times the base weight's std (1/sqrt(in_features)) whatever r and alpha are. (Plain N(0, 0.3^2)
# for both factors made the all-module PEFT LoRA, scale 2, blow the output up ~20x.)
LORA_REL = 0.3


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def bf16_round(t):
    return t.to(torch.bfloat16).to(torch.float32)


def f16_round(t):
    return t.to(torch.float16).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# diffusers <-> BFL conversion (docs/flux-model.md §4), width-agnostic
# ----------------------------------------------------------------------------------------------------------
def _top_level_pairs():
    # (diffusers module, BFL module), plain copies of .weight/.bias
    return [
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("proj_out", "final_layer.linear"),
    ]


def _double_pairs(i):
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    return [
        (d + "norm1.linear", b + "img_mod.lin"),
        (d + "norm1_context.linear", b + "txt_mod.lin"),
        (d + "attn.to_out.0", b + "img_attn.proj"),
        (d + "attn.to_add_out", b + "txt_attn.proj"),
        (d + "ff.net.0.proj", b + "img_mlp.0"),
        (d + "ff.net.2", b + "img_mlp.2"),
        (d + "ff_context.net.0.proj", b + "txt_mlp.0"),
        (d + "ff_context.net.2", b + "txt_mlp.2"),
    ]


def _double_norms(i):
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    return [
        (d + "attn.norm_q.weight", b + "img_attn.norm.query_norm.scale"),
        (d + "attn.norm_k.weight", b + "img_attn.norm.key_norm.scale"),
        (d + "attn.norm_added_q.weight", b + "txt_attn.norm.query_norm.scale"),
        (d + "attn.norm_added_k.weight", b + "txt_attn.norm.key_norm.scale"),
    ]


def _single_pairs(i):
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    return [(d + "proj_out", b + "linear2"), (d + "norm.linear", b + "modulation.lin")]


def _single_norms(i):
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    return [
        (d + "attn.norm_q.weight", b + "norm.query_norm.scale"),
        (d + "attn.norm_k.weight", b + "norm.key_norm.scale"),
    ]


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(sd, num_layers, num_single):
    src = dict(sd)
    out = {}

    def take(k):
        return src.pop(k)

    def linear(dm, bm):
        for s in ("weight", "bias"):
            out[f"{bm}.{s}"] = take(f"{dm}.{s}").clone()

    for dm, bm in _top_level_pairs():
        linear(dm, bm)
    for s in ("weight", "bias"):  # diffusers (scale, shift) -> BFL (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{s}"] = _swap_halves(take(f"norm_out.linear.{s}"))
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for dm, bm in _double_pairs(i):
            linear(dm, bm)
        for dk, bk in _double_norms(i):
            out[bk] = take(dk).clone()
        for s in ("weight", "bias"):
            out[f"{b}img_attn.qkv.{s}"] = torch.cat([take(f"{d}attn.to_{x}.{s}") for x in "qkv"], dim=0)
            out[f"{b}txt_attn.qkv.{s}"] = torch.cat([take(f"{d}attn.add_{x}_proj.{s}") for x in "qkv"], dim=0)
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for dm, bm in _single_pairs(i):
            linear(dm, bm)
        for dk, bk in _single_norms(i):
            out[bk] = take(dk).clone()
        for s in ("weight", "bias"):
            parts = [take(f"{d}attn.to_{x}.{s}") for x in "qkv"] + [take(f"{d}proj_mlp.{s}")]
            out[f"{b}linear1.{s}"] = torch.cat(parts, dim=0)
    assert not src, f"unconverted diffusers keys: {sorted(src)}"
    return out


def bfl_to_diffusers(sd, num_layers, num_single):
    src = dict(sd)
    out = {}

    def take(k):
        return src.pop(k)

    def linear(dm, bm):
        for s in ("weight", "bias"):
            out[f"{dm}.{s}"] = take(f"{bm}.{s}").clone()

    for dm, bm in _top_level_pairs():
        linear(dm, bm)
    for s in ("weight", "bias"):
        out[f"norm_out.linear.{s}"] = _swap_halves(take(f"final_layer.adaLN_modulation.1.{s}"))
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for dm, bm in _double_pairs(i):
            linear(dm, bm)
        for dk, bk in _double_norms(i):
            out[dk] = take(bk).clone()
        for s in ("weight", "bias"):
            for x, t in zip("qkv", take(f"{b}img_attn.qkv.{s}").chunk(3, dim=0)):
                out[f"{d}attn.to_{x}.{s}"] = t.clone()
            for x, t in zip("qkv", take(f"{b}txt_attn.qkv.{s}").chunk(3, dim=0)):
                out[f"{d}attn.add_{x}_proj.{s}"] = t.clone()
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        hidden = sd[f"{b}linear2.weight"].shape[0]
        for dm, bm in _single_pairs(i):
            linear(dm, bm)
        for dk, bk in _single_norms(i):
            out[dk] = take(bk).clone()
        for s in ("weight", "bias"):
            w = take(f"{b}linear1.{s}")
            mlp = w.shape[0] - 3 * hidden
            q, k, v, m = torch.split(w, [hidden, hidden, hidden, mlp], dim=0)
            out[f"{d}attn.to_q.{s}"], out[f"{d}attn.to_k.{s}"] = q.clone(), k.clone()
            out[f"{d}attn.to_v.{s}"], out[f"{d}proj_mlp.{s}"] = v.clone(), m.clone()
    assert not src, f"unconverted BFL keys: {sorted(src)}"
    return out


# ----------------------------------------------------------------------------------------------------------
# Independent BFL-layout forward (docs/flux-model.md §2, written from the BFL module code, float64).
# Used only as a check that tiny-bfl.safetensors + the kohya/comfy merges mean what the BFL layout says
# (fused q/k/v order, linear1 split, shift/scale order of the final layer) — not just that our two converters
# invert each other.
# ----------------------------------------------------------------------------------------------------------
def bfl_forward(w, inp, num_heads, axes_dim, theta=10000.0, f32_time_embedding=True, out_f64=False):
    F = torch.nn.functional
    w = {k: v.double() for k, v in w.items()}
    x = {k: v.double() for k, v in inp.items()}

    def lin(name, t):
        return F.linear(t, w[f"{name}.weight"], w[f"{name}.bias"])

    def mlp_emb(name, t):
        return lin(f"{name}.out_layer", F.silu(lin(f"{name}.in_layer", t)))

    def tstep(t, dim=256, max_period=10000, time_factor=1000.0):
        # BFL and diffusers both build the sinusoid in float32 (t*1000, freqs and their product); at
        # guidance*1000 = 4000 rad the f32 rounding of the argument moves the embedding by ~1e-4, which shows
        # up as ~1e-5 relative in the output, so the check reproduces it (f32_time_embedding=True).
        dt = torch.float32 if f32_time_embedding else torch.float64
        t = time_factor * t.to(dt)
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt) / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()

    def ln(t):
        return F.layer_norm(t, t.shape[-1:], eps=1e-6)

    def rms(t, scale):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    def rope_pe(ids):  # ids [L, 3] -> cos, sin [L, D/2]
        angs = []
        for a, d in enumerate(axes_dim):
            omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
            angs.append(ids[:, a:a + 1] * omega[None])
        ang = torch.cat(angs, dim=-1)
        return torch.cos(ang), torch.sin(ang)

    def apply_rope(t, cos, sin):  # t [B, H, L, D], interleaved pairs (2i, 2i+1)
        t0, t1 = t[..., 0::2], t[..., 1::2]
        return torch.stack([cos * t0 - sin * t1, sin * t0 + cos * t1], dim=-1).flatten(-2)

    def heads(t):  # [B, L, H*D] -> [B, H, L, D]
        b, l, hd = t.shape
        return t.view(b, l, num_heads, hd // num_heads).transpose(1, 2)

    def split_qkv(t):  # "B L (K H D) -> K B H L D"
        return [heads(c) for c in t.chunk(3, dim=-1)]

    def attention(q, k, v, cos, sin):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        b, h, l, d = a.shape
        return a.transpose(1, 2).reshape(b, l, h * d)

    def gelu(t):
        return F.gelu(t, approximate="tanh")

    img, txt = lin("img_in", x["img"]), lin("txt_in", x["txt"])
    vec = mlp_emb("time_in", tstep(x["timesteps"]))
    vec = vec + mlp_emb("guidance_in", tstep(x["guidance"]))
    vec = vec + mlp_emb("vector_in", x["y"])
    cos, sin = rope_pe(torch.cat([x["txt_ids"], x["img_ids"]], dim=0))
    lt = txt.shape[1]
    nd = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("double_blocks."))
    ns = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("single_blocks."))
    for i in range(nd):
        p = f"double_blocks.{i}."
        im = lin(p + "img_mod.lin", F.silu(vec))[:, None].chunk(6, dim=-1)
        tm = lin(p + "txt_mod.lin", F.silu(vec))[:, None].chunk(6, dim=-1)
        iq, ik, iv = split_qkv(lin(p + "img_attn.qkv", (1 + im[1]) * ln(img) + im[0]))
        iq, ik = rms(iq, w[p + "img_attn.norm.query_norm.scale"]), rms(ik, w[p + "img_attn.norm.key_norm.scale"])
        tq, tk, tv = split_qkv(lin(p + "txt_attn.qkv", (1 + tm[1]) * ln(txt) + tm[0]))
        tq, tk = rms(tq, w[p + "txt_attn.norm.query_norm.scale"]), rms(tk, w[p + "txt_attn.norm.key_norm.scale"])
        a = attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), cos, sin)
        ta, ia = a[:, :lt], a[:, lt:]
        img = img + im[2] * lin(p + "img_attn.proj", ia)
        img = img + im[5] * lin(p + "img_mlp.2", gelu(lin(p + "img_mlp.0", (1 + im[4]) * ln(img) + im[3])))
        txt = txt + tm[2] * lin(p + "txt_attn.proj", ta)
        txt = txt + tm[5] * lin(p + "txt_mlp.2", gelu(lin(p + "txt_mlp.0", (1 + tm[4]) * ln(txt) + tm[3])))
    h = torch.cat([txt, img], dim=1)
    hidden = h.shape[-1]
    for i in range(ns):
        p = f"single_blocks.{i}."
        sh, sc, g = lin(p + "modulation.lin", F.silu(vec))[:, None].chunk(3, dim=-1)
        y1 = lin(p + "linear1", (1 + sc) * ln(h) + sh)
        q, k, v = split_qkv(y1[..., : 3 * hidden])
        q, k = rms(q, w[p + "norm.query_norm.scale"]), rms(k, w[p + "norm.key_norm.scale"])
        a = attention(q, k, v, cos, sin)
        h = h + g * lin(p + "linear2", torch.cat([a, gelu(y1[..., 3 * hidden:])], dim=-1))
    img = h[:, lt:]
    shift, scale = lin("final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=-1)
    out = lin("final_layer.linear", (1 + scale[:, None]) * ln(img) + shift[:, None])
    return out if out_f64 else out.float()


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def init_model(gen):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**MODEL_CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # every Linear weight: keep activations O(1)
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "norm" in name and name.endswith(".weight"):  # QK RMSNorm scales
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")
            p.copy_(bf16_round(p))  # the bf16 files hold exactly these values
    model.eval()
    return model


def run_model(model, inputs, **kw):
    with torch.no_grad():
        return model(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"],
            txt_ids=inputs["txt_ids"],
            guidance=inputs["guidance"],
            return_dict=False,
            **kw,
        )[0].detach().clone()


def model_forward(model, inputs, params=None):
    """The model call of `run_model`, with autograd; `params` (name -> tensor, may be non-leaf) replaces the
    module's parameters functionally (torch.func.functional_call), so gradients flow into whatever built them."""
    kw = dict(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"],
        txt_ids=inputs["txt_ids"],
        guidance=inputs["guidance"],
        return_dict=False,
    )
    if params is None:
        return model(**kw)[0]
    return torch.func.functional_call(model, params, args=(), kwargs=kw, strict=True)[0]


@contextlib.contextmanager
def flux_rope_f64():
    """Run diffusers' Flux attention RoPE in float64 for a float64 model.

    diffusers' `apply_rotary_emb` computes `(x.float() * cos + x_rotated.float() * sin).to(x.dtype)`, so a model
    cast to float64 still rounds q and k to float32 there. That makes L a step function at the ~1e-7 level, which
    ruins float64 finite differences (and blurs float64 references). Inside this context a float64 `x` is rotated
    in float64 by the same formula; every other dtype goes to the original function (float32 runs are unchanged).
    Only the golden-gradient checks use it. (The RoPE cos/sin tables and the time sinusoid stay float32: they are
    constants w.r.t. the LoRA factors.)"""
    import diffusers.models.transformers.transformer_flux as tf

    orig = tf.apply_rotary_emb
    calls = [0]

    def rope(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        if x.dtype != torch.float64:
            return orig(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim,
                        sequence_dim=sequence_dim)
        assert use_real and use_real_unbind_dim == -1 and sequence_dim == 1, (use_real, use_real_unbind_dim, sequence_dim)
        calls[0] += 1
        cos, sin = (t[None, :, None, :].to(x.device) for t in freqs_cis)
        x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        return x * cos + x_rotated * sin

    tf.apply_rotary_emb = rope
    try:
        yield calls
    finally:
        tf.apply_rotary_emb = orig


def mse_loss(out, target):
    """L = mean((out - target)^2) over all elements (the loss of the golden gradients)."""
    return ((out - target) ** 2).mean()


def model_with_weights(base_model, sd):
    m = copy.deepcopy(base_model)
    m.load_state_dict(sd, strict=True)
    m.eval()
    return m


def bfl_linear_modules(bfl_sd):
    """BFL module name -> (out, in) for every 2-D weight."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in bfl_sd.items() if k.endswith(".weight") and v.ndim == 2}


def add_delta(sd, module, delta):
    key = f"{module}.weight"
    assert sd[key].shape == delta.shape, (module, sd[key].shape, delta.shape)
    sd[key] = sd[key] + delta


def rand_lora(gen, r, alpha, shape_out_in, rounder=None):
    """(A [r, in], B [out, r]) drawn as described at LORA_REL."""
    out_f, in_f = shape_out_in
    a = torch.randn((r, in_f), generator=gen) / math.sqrt(in_f)
    b = torch.randn((out_f, r), generator=gen) * (LORA_REL / ((alpha / r) * math.sqrt(r)))
    if rounder is not None:
        a, b = rounder(a), rounder(b)
    return a, b


def save_st(tensors, path, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    canonicalize_st_header(path)


def canonicalize_st_header(path):
    """Rewrite a safetensors header with its __metadata__ keys sorted.

    The safetensors writer keeps metadata in a hash map, so with more than one metadata key the header bytes
    (not the content) change from run to run. Sorting them makes every file byte-for-byte reproducible. The
    tensor entries and the data section are left untouched; the header is re-padded with spaces to 8 bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" not in header:
        return
    new = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    new.update(header)
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def st_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


README_TEMPLATE = """# Golden fixtures: tiny FLUX transformer (+ LoRA files)

Generated by `tools/make_fixtures.py` (do not edit by hand). Regenerate from the repository root with

```
python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements-fixtures.txt && tools/.venv/bin/python tools/make_fixtures.py
```

The script is deterministic (fixed seeds, CPU, float32) and asserts its own cross-checks; it rewrites every file
listed here. Python packages: torch, diffusers, transformers, peft, safetensors, numpy (versions used are in the
summary at the bottom and in `tools/requirements-fixtures.txt`).

## The model

diffusers `FluxTransformer2DModel(patch_size=1, in_channels=8, out_channels=None, num_layers=2,
num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4,6,6))`: hidden 32, 2 heads of 16, MLP 128,
2 double + 2 single blocks, time/guidance sinusoidal embedding 256, RoPE axes (4,6,6), theta 10000.

Random weights: Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), QK-RMSNorm scales ~ 1 + N(0, 0.1^2);
then **every parameter is rounded to bf16**, so the bf16 checkpoints below hold exactly the weights the reference
outputs were computed with (in float32, eval mode).

## Files

| file | dtype | content |
|---|---|---|
| `tiny-diffusers/config.json` | - | `model.save_config()` of the model above |
| `tiny-diffusers/diffusion_pytorch_model-0000{1,2}-of-00002.safetensors` | bf16 | the weights, diffusers names, first/second half of the state-dict order; metadata `{"format":"pt"}` |
| `tiny-diffusers/diffusion_pytorch_model.safetensors.index.json` | - | `{"metadata":{"total_size":N},"weight_map":{key: shard}}`; `FluxTransformer2DModel.from_pretrained` loads it (checked) |
| `tiny-bfl.safetensors` | bf16 | the same weights in the original BFL layout (no key prefix), converted by hand per docs/flux-model.md §4: q/k/v(/mlp) fused on dim 0, `final_layer.adaLN_modulation.1` = diffusers `norm_out.linear` with the two halves swapped (BFL shift,scale vs diffusers scale,shift). BFL -> diffusers round-trips bit-exactly (checked) |
| `tiny-inputs.safetensors` | f32 | `img` [2,16,8], `img_ids` [16,3], `txt` [2,5,24], `txt_ids` [5,3], `y` [2,12], `timesteps` [2], `guidance` [2] |
| `tiny-expected.safetensors` | f32 | outputs [2,16,8]: `base`, `peft`, `peft_nometa`, `kohya`, `comfy`, `onetrainer`, `stack` |
| `lora-peft.safetensors` | f32 | diffusers/PEFT LoRA, r=4, lora_alpha=8 (scale 2), metadata |
| `lora-peft-nometa.safetensors` | f32 | diffusers/PEFT LoRA, r=2, lora_alpha=2, **no metadata** |
| `lora-kohya.safetensors` | bf16 | kohya sd-scripts LoRA, r=4, alpha=2.0 |
| `lora-comfy.safetensors` | f16 | ComfyUI-native LoRA, r=3, alpha=1.5 |
| `lora-onetrainer.safetensors` | f32 | OneTrainer LoRA, r=2, alpha=1.0 |
| `tiny-grad-target.safetensors` | f32 | `target` [2,16,8] ~ N(0,1), regression target of the golden gradients |
| `tiny-grad-peft.safetensors` | f32 | dL/d(LoRA factors) of `lora-peft.safetensors` (100 tensors, the file's key names) + `loss` [1] |
| `tiny-grad-kohya.safetensors` | f32 | same for `lora-kohya.safetensors` (62 tensors) + `loss` [1] |
| `tiny-grad-onetrainer.safetensors` | f32 | same for `lora-onetrainer.safetensors` (12 tensors) + `loss` [1] |

### Inputs

- `img` ~ N(0,1) [B=2, L_img=16, 8]; `txt` ~ N(0,1) [2, 5, 24]; `y` ~ N(0,1) [2, 12].
- `img_ids[i] = (i % 2, i // 4, i % 4)` for i = 0..15 (row r = i//4, column c = i%4; axis 0 deliberately
  non-zero, alternating 0/1, so the axis-0 RoPE block is exercised). `txt_ids` = zeros. Both 2-D (no batch).
- `timesteps = [0.3, 0.85]` (sigma in [0,1]) and `guidance = [3.5, 4.0]`. Both are multiplied by 1000 inside
  the model (diffusers `forward`; BFL `timestep_embedding` time_factor) before the 256-wide cos/sin embedding.
  Everything is float32: there is no bf16 cast of t (unlike the bf16 reference pipelines).
- Call: `transformer(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=timesteps,
  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]`.

### LoRA semantics (all files)

dW = multiplier * (alpha / r) * B @ A with B = `lora_B` = `lora_up` [out, r] and A = `lora_A` = `lora_down` [r, in].
Random values: A ~ N(0, 1/in), B ~ N(0, (0.3 / ((alpha/r) * sqrt(r)))^2) (both non-zero), so each delta is
about 0.3x the base weight's magnitude.

- **`lora-peft.safetensors`**: keys `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, no alpha
  tensors. Written by diffusers' own `FluxLoraLoaderMixin.save_lora_weights`, so the metadata is
  `{"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.<LoraConfig field>": value, ...},
  indent=2, sort_keys=True)}` with `transformer.r` = 4, `transformer.lora_alpha` = 8 and
  `transformer.target_modules` = [to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out,
  ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2, proj_mlp, proj_out, norm1.linear,
  norm1_context.linear, norm.linear, norm_out.linear, x_embedder, context_embedder, linear_1, linear_2] (sorted).
  PEFT suffix matching puts a LoRA on **every** Linear of the model (50 modules): single blocks' `attn.to_q/k/v`
  (row slices of BFL `linear1`, with `proj_mlp` the last 128 rows), both the single blocks' `proj_out`
  (`linear2`) and the top-level `proj_out` (`final_layer.linear`), all six `time_text_embed.*.linear_{1,2}`,
  and `norm_out.linear` (diffusers scale,shift row order: swap B's halves for BFL's `adaLN_modulation.1`).
  Reference computed by PEFT itself (unmerged LoRA layers, `lora_dropout` 0).
- **`lora-peft-nometa.safetensors`**: same key layout, targets [to_q, to_k, to_v, to_out.0, proj_out] (hits the
  single blocks' to_q/k/v and proj_out and the top-level proj_out too), r=2, alpha=2, and **no `__metadata__`
  at all**: a loader must assume alpha = r (scale 1), as diffusers does. Reference computed by PEFT.
- **`lora-kohya.safetensors`**: keys `lora_unet_<BFL module, dots -> underscores>.lora_down.weight` [r,in],
  `.lora_up.weight` [out,r], `.alpha` (0-d, 2.0), all bf16, r=4 (scale 0.5). Modules: every BFL Linear inside
  the blocks (`double_blocks_{0,1}_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}`,
  `single_blocks_{0,1}_{linear1,linear2,modulation_lin}`) plus `img_in`, `txt_in`, `time_in_in_layer`,
  `final_layer_linear`, `final_layer_adaLN_modulation_1` (31 modules). Metadata (strings):
  `ss_network_module=networks.lora_flux`, `ss_network_dim=4`, `ss_network_alpha=2.0`.
  Reference: W_bfl += 0.5 * up @ down in f32 on the BFL-layout weights, convert to diffusers, run diffusers.
- **`lora-comfy.safetensors`**: keys `diffusion_model.<BFL module>.lora_A.weight`, `.lora_B.weight`, `.alpha`
  (0-d, 1.5), all f16, r=3 (scale 0.5). Modules: `double_blocks.{0,1}.img_attn.qkv`,
  `double_blocks.0.txt_mlp.2`, `single_blocks.{0,1}.linear1`, `single_blocks.1.linear2`,
  `final_layer.adaLN_modulation.1`. No metadata. Reference merged in BFL layout as for kohya.
- **`lora-onetrainer.safetensors`**: keys `lora_transformer_<diffusers module, dots -> underscores>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` (0-d, 1.0), all f32, r=2 (scale 0.5). Modules:
  `transformer_blocks.0.attn.to_q`, `transformer_blocks.1.attn.add_k_proj`,
  `single_transformer_blocks.0.proj_mlp`, `single_transformer_blocks.1.attn.to_v`,
  `transformer_blocks.0.ff_context.net.2`, `norm_out.linear` (diffusers scale,shift order). No metadata.
  Reference: W_diffusers += 0.5 * up @ down, run diffusers.

LoRA values stored in bf16/f16 were rounded to that type before the reference was computed, so the files are
exact. The rounding of `multiplier * (alpha/r) * B@A` and of its sum with W is f32 (merged) or follows PEFT's
unmerged `base(x) + scale * B(A(x))`; the two routes agree to ~1e-6 relative L2 (checked).

### Expected outputs (`tiny-expected.safetensors`)

- `base`: no LoRA.
- `peft`, `peft_nometa`, `kohya`, `comfy`, `onetrainer`: that LoRA alone at multiplier 1.0.
- `stack`: `lora-peft` at 0.8 + `lora-kohya` at -0.5 + `lora-onetrainer` at 1.3, all active together
  (reference: all three scaled deltas merged, then one diffusers run; cross-checked against PEFT at scale 0.8 on
  top of the merged kohya + OneTrainer weights).

Tolerances: the f32 references differ from a float64 recomputation by ~3e-7 relative L2 (summary below), and an
independent float64 re-implementation of the BFL forward (`bfl_forward` in the script) reproduces `base`,
`kohya` and `comfy` from the BFL-layout weights to ~2e-7. One step is sensitive: the 256-wide time/guidance
sinusoid. Both BFL and diffusers compute it in float32 (`args = (1000*t)_f32 * exp(-ln(10000)*j/128)_f32`); at
guidance 4.0 the argument is ~4000 rad, so computing it in f64 instead moves the output by ~1.2e-5 relative L2.
Compute it in f32 in that order to stay at the ~1e-6 level.

### Golden LoRA gradients (`tiny-grad-*.safetensors`)

- Loss: `L = mean((out - target)^2)` averaged over **all** 2*16*8 = 256 elements (so dL/dout = 2*(out - target)/256),
  `target` from `tiny-grad-target.safetensors` (own generator, seed 20241129, drawn after everything else, so
  the files above are unchanged by it), `out` = the model on `tiny-inputs.safetensors` with **one** LoRA file at
  multiplier 1.0, its own alpha/r applying (peft 8/4 = 2, kohya 2/4 = 0.5, OneTrainer 1/2 = 0.5). `out` is
  bit-identical to `tiny-expected.safetensors` `peft` / `kohya` / `onetrainer` (checked).
- Each file holds dL/d(every LoRA factor tensor of that LoRA file) by torch autograd in float32 (base weights
  frozen), under **exactly the LoRA file's key names**, same shapes, all float32; no entry for `.alpha`. Plus
  `loss` [1] f32 (the f32 forward's loss). Metadata (strings): `lora`, `multiplier` = 1.0, `inputs`, `target`,
  `loss`.
- `tiny-grad-peft.safetensors` (100 tensors, `transformer.<module>.lora_{A,B}.weight`): through diffusers + PEFT
  itself (the adapter model of the `peft` reference, unmerged LoRA layers, requires_grad only on
  `lora_A/lora_B["default"]`; PEFT's adapter name stripped from the parameter names). Cross-checks: the same
  through `load_lora_adapter(lora-peft.safetensors)` (identical); through merged weights W + 2*B@A
  (`torch.func.functional_call`, ~2e-6); central finite differences in float64 (h = 1e-5) on 6 elements of
  6 different tensors (3 lora_A, 3 lora_B, random among entries with |grad| >= 1% of that tensor's max): f64
  autograd within ~1e-7 relative, the stored f32 values within a few 1e-6.
- `tiny-grad-kohya.safetensors` (62 tensors, `lora_unet_<BFL module>.lora_{down,up}.weight`): through merged
  BFL-layout weights W_bfl + 0.5*up@down with up/down as float32 leaves (the bf16 factors upcast exactly), the
  differentiable BFL -> diffusers converter and `functional_call` of the diffusers model. So the gradient of a
  fused module (`img/txt_attn.qkv`, `linear1`, `final_layer.adaLN_modulation.1`) collects all of its q/k/v(/mlp)
  row blocks (the latter with its halves swapped back to BFL shift,scale order). Cross-checked against the
  independent float64 BFL-layout forward (`bfl_forward`, ~1e-6).
- `tiny-grad-onetrainer.safetensors` (12 tensors, `lora_transformer_<diffusers module>.lora_{down,up}.weight`,
  incl. `norm_out.linear` in diffusers scale,shift row order): through merged diffusers weights W + 0.5*up@down;
  cross-checked against a PEFT adapter holding the same factors (unmerged, ~1e-6).
- Tolerances: per tensor, the stored f32 gradients differ from the same autograd in float64 by <= ~1.6e-6
  relative L2 (summary below); an f32 implementation with another reduction order should land within ~1e-5
  (1e-4 is a safe test bound), the loss within ~1e-6 relative.
- float64 references: diffusers' `apply_rotary_emb` computes `(x.float() * cos + ...).to(x.dtype)`, i.e. it
  rounds q and k to float32 even in a model cast to float64. The gradient checks therefore run their float64
  passes with a float64 RoPE (`flux_rope_f64` in the script: same formula, no downcast; float32 runs untouched).
  Without it the float64 finite differences disagree with autograd by ~1e-3. (The output floor figures above
  do not use it.)

## Generator summary (stdout of the run that wrote these files)

```
@SUMMARY@
```
"""


# ----------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(repo, "tests", "fixtures"))
    args = ap.parse_args()
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)

    import diffusers
    import peft
    import safetensors
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    summary = []

    def log(line=""):
        print(line)
        summary.append(line)

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(SEED)

    NL, NS = MODEL_CONFIG["num_layers"], MODEL_CONFIG["num_single_layers"]

    # ---------------- model ----------------
    base_model = init_model(gen)
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    for k, v in base_sd.items():
        assert torch.equal(v, bf16_round(v)), k

    # ---------------- inputs ----------------
    B, L_IMG, L_TXT = 2, 16, 5
    i = torch.arange(L_IMG)
    inputs = {
        "img": torch.randn((B, L_IMG, MODEL_CONFIG["in_channels"]), generator=gen),
        "img_ids": torch.stack([i % 2, i // 4, i % 4], dim=1).to(torch.float32),
        "txt": torch.randn((B, L_TXT, MODEL_CONFIG["joint_attention_dim"]), generator=gen),
        "txt_ids": torch.zeros((L_TXT, 3), dtype=torch.float32),
        "y": torch.randn((B, MODEL_CONFIG["pooled_projection_dim"]), generator=gen),
        "timesteps": torch.tensor([0.3, 0.85], dtype=torch.float32),
        "guidance": torch.tensor([3.5, 4.0], dtype=torch.float32),
    }
    save_st(inputs, os.path.join(out_dir, "tiny-inputs.safetensors"))

    expected, ref_models = {}, {}

    def reference(name, model):
        ref_models[name] = model
        expected[name] = run_model(model, inputs)

    reference("base", base_model)
    assert expected["base"].shape == (B, L_IMG, MODEL_CONFIG["in_channels"])
    assert torch.isfinite(expected["base"]).all()

    # ---------------- 1. diffusers sharded checkpoint (bf16) ----------------
    ddir = os.path.join(out_dir, "tiny-diffusers")
    if os.path.isdir(ddir):
        shutil.rmtree(ddir)
    os.makedirs(ddir)
    base_model.save_config(ddir)
    cfg = json.load(open(os.path.join(ddir, "config.json")))
    for k in ("axes_dims_rope", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "pooled_projection_dim", "in_channels", "guidance_embeds"):
        assert k in cfg, k
    keys = list(base_sd.keys())
    half = (len(keys) + 1) // 2
    shards = [keys[:half], keys[half:]]
    weight_map, total_size = {}, 0
    for si, shard_keys in enumerate(shards):
        fname = f"diffusion_pytorch_model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: base_sd[k].to(torch.bfloat16) for k in shard_keys}
        save_st(tensors, os.path.join(ddir, fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total_size += t.numel() * t.element_size()
    with open(os.path.join(ddir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
        f.write("\n")
    # diffusers itself must load it back to identical weights / outputs
    reloaded = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, base_sd[k]), k
    assert torch.equal(run_model(reloaded, inputs), expected["base"])
    del reloaded

    # ---------------- 2. BFL single file (bf16) ----------------
    bfl_sd = diffusers_to_bfl(base_sd, NL, NS)
    back = bfl_to_diffusers(bfl_sd, NL, NS)
    assert set(back) == set(base_sd)
    for k in base_sd:
        assert torch.equal(back[k], base_sd[k]), f"BFL round trip mismatch at {k}"
    save_st({k: v.to(torch.bfloat16) for k, v in bfl_sd.items()}, os.path.join(out_dir, "tiny-bfl.safetensors"),
            metadata={"format": "pt"})
    bfl_loaded = {k: v.to(torch.float32) for k, v in load_file(os.path.join(out_dir, "tiny-bfl.safetensors")).items()}
    back = bfl_to_diffusers(bfl_loaded, NL, NS)
    for k in base_sd:
        assert torch.equal(back[k], base_sd[k]), f"BFL file round trip mismatch at {k}"
    bfl_mods = bfl_linear_modules(bfl_sd)
    diff_mods = {k[: -len(".weight")]: tuple(v.shape) for k, v in base_sd.items()
                 if k.endswith(".weight") and v.ndim == 2}

    def bfl_model(bfl_weights):
        return model_with_weights(base_model, bfl_to_diffusers(bfl_weights, NL, NS))

    def run_diff(diff_weights):
        return run_model(model_with_weights(base_model, diff_weights), inputs)

    # ---------------- 4a/4b. PEFT LoRAs, reference computed by PEFT ----------------
    def make_peft(r, alpha, targets):
        m = copy.deepcopy(base_model)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
        # diffusers PeftAdapterMixin -> peft.inject_adapter_in_model, adapter "default". PEFT mutates the config
        # it is given (target-module compression), so hand it a copy and keep `cfg` as written.
        m.add_adapter(copy.deepcopy(cfg))
        names = []
        with torch.no_grad():
            for name, mod in m.named_modules():
                if isinstance(mod, LoraLayer):
                    a = mod.lora_A["default"].weight
                    b = mod.lora_B["default"].weight
                    ra, rb = rand_lora(gen, r, alpha, (b.shape[0], a.shape[1]))
                    a.copy_(ra)
                    b.copy_(rb)
                    assert mod.scaling["default"] == alpha / r
                    names.append(name)
        m.eval()
        sd = get_peft_model_state_dict(m)  # keys "<module>.lora_A.weight" (adapter name stripped)
        sd = {k: v.detach().clone().to(torch.float32) for k, v in sd.items()}
        assert len(sd) == 2 * len(names)
        return m, cfg, sd, names

    def peft_deltas(sd, r, alpha, mult=1.0):
        """diffusers module -> (alpha/r)*B@A*mult from a PEFT state dict."""
        out = {}
        for k in sd:
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                out[mod] = mult * (alpha / r) * (sd[f"{mod}.lora_B.weight"] @ sd[k])
        return out

    # a. full PEFT with metadata
    peft_model, peft_cfg, peft_sd, peft_names = make_peft(4, 8, PEFT_TARGETS)
    # suffix matching must hit single blocks' to_q/k/v and both proj_out's, and all embedders' linear_1/2
    for must in ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out", "proj_out",
                 "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "single_transformer_blocks.0.norm.linear"]:
        assert must in peft_names, must
    assert set(peft_names) == set(diff_mods), sorted(set(diff_mods) ^ set(peft_names))
    reference("peft", peft_model)
    # LoraConfig.to_dict() of the config as given (diffusers' training scripts pass
    # transformer.peft_config["default"].to_dict(), where PEFT may already have compressed a >=20-entry
    # target_modules list into minimal suffixes such as "2", "linear", "proj"; the given list is clearer).
    meta = peft_cfg.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}  # deterministic JSON
    assert meta["target_modules"] == sorted(PEFT_TARGETS), meta["target_modules"]
    FluxLoraLoaderMixin.save_lora_weights(
        save_directory=out_dir,
        transformer_lora_layers=peft_sd,
        weight_name="lora-peft.safetensors",
        transformer_lora_adapter_metadata=meta,
    )
    canonicalize_st_header(os.path.join(out_dir, "lora-peft.safetensors"))
    # validate merge method: merged-weights route == PEFT's own computation
    merged = dict(base_sd)
    for mod, d in peft_deltas(peft_sd, 4, 8).items():
        add_delta(merged, mod, d)
    err = rel_l2(run_diff(merged), expected["peft"])
    log(f"check: PEFT merged-route vs PEFT unmerged rel-L2 = {err:.3e}")
    assert err < 1e-5, err

    # b. PEFT without metadata (r=2, alpha=2)
    nm_model, _, nm_sd, nm_names = make_peft(2, 2, PEFT_NOMETA_TARGETS)
    assert "proj_out" in nm_names and "single_transformer_blocks.0.proj_out" in nm_names
    reference("peft_nometa", nm_model)
    save_st({f"transformer.{k}": v for k, v in nm_sd.items()}, os.path.join(out_dir, "lora-peft-nometa.safetensors"))

    # diffusers' own loader must reproduce both PEFT references from the files (tests the metadata too)
    for fname, key in (("lora-peft.safetensors", "peft"), ("lora-peft-nometa.safetensors", "peft_nometa")):
        m = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
        m.load_lora_adapter(out_dir, weight_name=fname, prefix="transformer", adapter_name="x")
        err = rel_l2(run_model(m, inputs), expected[key])
        log(f"check: diffusers load_lora_adapter({fname}) vs PEFT reference rel-L2 = {err:.3e}")
        assert err < 1e-6, (fname, err)
        del m

    hdr = st_header(os.path.join(out_dir, "lora-peft-nometa.safetensors"))
    assert "__metadata__" not in hdr, hdr["__metadata__"]
    hdr = st_header(os.path.join(out_dir, "lora-peft.safetensors"))["__metadata__"]
    assert hdr["format"] == "pt"
    md = json.loads(hdr["lora_adapter_metadata"])
    assert md["transformer.r"] == 4 and md["transformer.lora_alpha"] == 8, md
    assert md["transformer.target_modules"] == sorted(PEFT_TARGETS), md["transformer.target_modules"]
    assert all(k.startswith("transformer.") for k in md)

    def check_bfl(name, bfl_weights):
        err = rel_l2(bfl_forward(bfl_weights, inputs, MODEL_CONFIG["num_attention_heads"],
                                 MODEL_CONFIG["axes_dims_rope"]), expected[name])
        log(f"check: independent BFL-layout forward (f64, f32 time embedding) vs '{name}' rel-L2 = {err:.3e}")
        assert err < 2e-6, (name, err)

    check_bfl("base", bfl_loaded)
    err = rel_l2(bfl_forward(bfl_loaded, inputs, MODEL_CONFIG["num_attention_heads"], MODEL_CONFIG["axes_dims_rope"],
                             f32_time_embedding=False), expected["base"])
    log(f"info:  same, but time/guidance embedding in f64 instead of f32:  rel-L2 = {err:.3e}")

    # ---------------- 4c. kohya (BFL names, bf16) ----------------
    kohya_mods = []
    for i in range(NL):
        for s in ("img", "txt"):
            kohya_mods += [f"double_blocks.{i}.{s}_attn.qkv", f"double_blocks.{i}.{s}_attn.proj",
                           f"double_blocks.{i}.{s}_mlp.0", f"double_blocks.{i}.{s}_mlp.2", f"double_blocks.{i}.{s}_mod.lin"]
    for i in range(NS):
        kohya_mods += [f"single_blocks.{i}.linear1", f"single_blocks.{i}.linear2", f"single_blocks.{i}.modulation.lin"]
    kohya_mods += ["img_in", "txt_in", "time_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    K_R, K_ALPHA = 4, 2.0
    kohya_file, kohya_delta = {}, {}
    for mod in kohya_mods:
        down, up = rand_lora(gen, K_R, K_ALPHA, bfl_mods[mod], rounder=bf16_round)
        name = "lora_unet_" + mod.replace(".", "_")
        kohya_file[f"{name}.lora_down.weight"] = down.to(torch.bfloat16)
        kohya_file[f"{name}.lora_up.weight"] = up.to(torch.bfloat16)
        kohya_file[f"{name}.alpha"] = torch.tensor(K_ALPHA, dtype=torch.bfloat16)
        kohya_delta[mod] = (K_ALPHA / K_R) * (up @ down)
    save_st(kohya_file, os.path.join(out_dir, "lora-kohya.safetensors"),
            metadata={"ss_network_module": "networks.lora_flux", "ss_network_dim": str(K_R),
                      "ss_network_alpha": str(K_ALPHA)})
    w = dict(bfl_sd)
    for mod, d in kohya_delta.items():
        add_delta(w, mod, d)
    reference("kohya", bfl_model(w))
    check_bfl("kohya", w)

    # ---------------- 4d. ComfyUI-native (BFL names, lora_A/B, fp16) ----------------
    comfy_mods = ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv", "double_blocks.0.txt_mlp.2",
                  "single_blocks.0.linear1", "single_blocks.1.linear1", "single_blocks.1.linear2",
                  "final_layer.adaLN_modulation.1"]
    C_R, C_ALPHA = 3, 1.5
    comfy_file, comfy_delta = {}, {}
    for mod in comfy_mods:
        a, b = rand_lora(gen, C_R, C_ALPHA, bfl_mods[mod], rounder=f16_round)
        comfy_file[f"diffusion_model.{mod}.lora_A.weight"] = a.to(torch.float16)
        comfy_file[f"diffusion_model.{mod}.lora_B.weight"] = b.to(torch.float16)
        comfy_file[f"diffusion_model.{mod}.alpha"] = torch.tensor(C_ALPHA, dtype=torch.float16)
        comfy_delta[mod] = (C_ALPHA / C_R) * (b @ a)
    save_st(comfy_file, os.path.join(out_dir, "lora-comfy.safetensors"))
    w = dict(bfl_sd)
    for mod, d in comfy_delta.items():
        add_delta(w, mod, d)
    reference("comfy", bfl_model(w))
    check_bfl("comfy", w)

    # ---------------- 4e. OneTrainer (diffusers names with underscores, f32) ----------------
    ot_mods = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
               "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.attn.to_v",
               "transformer_blocks.0.ff_context.net.2", "norm_out.linear"]
    O_R, O_ALPHA = 2, 1.0
    ot_file, ot_delta = {}, {}
    for mod in ot_mods:
        down, up = rand_lora(gen, O_R, O_ALPHA, diff_mods[mod])
        name = "lora_transformer_" + mod.replace(".", "_")
        ot_file[f"{name}.lora_down.weight"] = down
        ot_file[f"{name}.lora_up.weight"] = up
        ot_file[f"{name}.alpha"] = torch.tensor(O_ALPHA, dtype=torch.float32)
        ot_delta[mod] = (O_ALPHA / O_R) * (up @ down)
    save_st(ot_file, os.path.join(out_dir, "lora-onetrainer.safetensors"))
    w = dict(base_sd)
    for mod, d in ot_delta.items():
        add_delta(w, mod, d)
    reference("onetrainer", model_with_weights(base_model, w))

    # ---------------- 5. stack: peft*0.8 + kohya*(-0.5) + onetrainer*1.3 ----------------
    S_PEFT, S_KOHYA, S_OT = 0.8, -0.5, 1.3
    w = dict(bfl_sd)
    for mod, d in kohya_delta.items():
        add_delta(w, mod, S_KOHYA * d)
    kohya_merged_diff = bfl_to_diffusers(w, NL, NS)  # base + kohya part, diffusers layout
    w = dict(kohya_merged_diff)
    for mod, d in ot_delta.items():
        add_delta(w, mod, S_OT * d)
    base_plus_ko_ot = dict(w)
    for mod, d in peft_deltas(peft_sd, 4, 8, S_PEFT).items():
        add_delta(w, mod, d)
    reference("stack", model_with_weights(base_model, w))
    # cross-check: PEFT adapter (unmerged, scale 0.8 via joint_attention_kwargs) on top of base+kohya+onetrainer
    m = model_with_weights(base_model, base_plus_ko_ot)
    m.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(PEFT_TARGETS)))
    res = set_peft_model_state_dict(m, peft_sd, adapter_name="default")
    assert not res.unexpected_keys, res.unexpected_keys
    m.eval()
    err = rel_l2(run_model(m, inputs, joint_attention_kwargs={"scale": S_PEFT}), expected["stack"])
    log(f"check: stack via PEFT(scale {S_PEFT}) + merged kohya/onetrainer vs all-merged rel-L2 = {err:.3e}")
    assert err < 1e-5, err
    del m

    # ---------------- expected outputs ----------------
    order = ["base", "peft", "peft_nometa", "kohya", "comfy", "onetrainer", "stack"]
    for k in order:
        assert expected[k].shape == (B, L_IMG, MODEL_CONFIG["in_channels"]) and torch.isfinite(expected[k]).all(), k
    save_st({k: expected[k].contiguous() for k in order}, os.path.join(out_dir, "tiny-expected.safetensors"))

    # ---------------- 6. golden LoRA gradients ----------------
    # Added after every file above is final: the target and the finite-difference picks come from their own
    # generators (GRAD_SEED, FD_SEED), so the RNG stream behind the files above is untouched.
    # L = mean((out - target)^2) over all B*L_IMG*C elements, `out` = model on tiny-inputs with ONE LoRA file at
    # multiplier 1.0 (the file's own alpha/r applies); dL/d(every LoRA factor) by autograd, base weights frozen.
    grad_gen = torch.Generator().manual_seed(GRAD_SEED)
    target = torch.randn((B, L_IMG, MODEL_CONFIG["in_channels"]), generator=grad_gen)
    save_st({"target": target}, os.path.join(out_dir, "tiny-grad-target.safetensors"))
    inputs64 = {k: v.double() for k, v in inputs.items()}
    targets = {torch.float32: target, torch.float64: target.double()}
    inps = {torch.float32: inputs, torch.float64: inputs64}
    base_model64 = copy.deepcopy(base_model).double()
    grad_stats = {}

    def lora_file(fname):
        return load_file(os.path.join(out_dir, fname))

    def peft_grads(model, adapter, dtype, prefix="transformer."):
        """Gradients through PEFT's own LoRA layers: requires_grad only on lora_A/lora_B of `adapter`; keys are
        the file's (`<prefix><module>.lora_A.weight`, adapter name stripped). Returns loss, out, grads, model,
        leaves (model is a copy of `model`, already cast to dtype by the caller)."""
        m = copy.deepcopy(model)
        m.requires_grad_(False)
        leaves = {}
        for name, p in m.named_parameters():
            for ab in ("lora_A", "lora_B"):
                suffix = f".{ab}.{adapter}.weight"
                if name.endswith(suffix):
                    assert p.dtype == dtype, (name, p.dtype)
                    p.requires_grad_(True)
                    leaves[f"{prefix}{name[: -len(suffix)]}.{ab}.weight"] = p
        assert leaves and sum(p.requires_grad for p in m.parameters()) == len(leaves)
        out = model_forward(m, inps[dtype])
        loss = mse_loss(out, targets[dtype])
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in leaves.items()}
        return loss.detach(), out.detach(), grads, m, leaves

    def merged_grads(factors, plan, layout, dtype, route="diffusers"):
        """Gradients through merged weights W + scale * up @ down, with up/down leaves (the file's factors cast
        to `dtype`). plan: [(module, down_key, up_key, scale)], module in `layout` ("bfl" or "diffusers") names.
        route "diffusers": functional_call of the diffusers model on the (converted) merged weights;
        route "bfl_forward": the independent BFL-layout forward (float64 only)."""
        leaves = {}
        for _, dk, uk, _ in plan:
            for k in (dk, uk):
                leaves[k] = factors[k].to(dtype).requires_grad_(True)
        w = {k: v.to(dtype) for k, v in (bfl_sd if layout == "bfl" else base_sd).items()}
        for mod, dk, uk, scale in plan:
            add_delta(w, mod, scale * (leaves[uk] @ leaves[dk]))
        if route == "bfl_forward":
            assert layout == "bfl" and dtype == torch.float64
            out = bfl_forward(w, inputs64, MODEL_CONFIG["num_attention_heads"], MODEL_CONFIG["axes_dims_rope"],
                              out_f64=True)
        else:
            if layout == "bfl":
                w = bfl_to_diffusers(w, NL, NS)
            out = model_forward(base_model if dtype == torch.float32 else base_model64, inps[dtype], w)
        loss = mse_loss(out, targets[dtype])
        gs = torch.autograd.grad(loss, list(leaves.values()))
        return loss.detach(), out.detach(), {k: g.detach() for k, g in zip(leaves, gs)}

    def compare(ga, gb, what, tol):
        """per-tensor rel-L2 of ga vs gb (reference); asserts < tol; returns {key: err}."""
        assert set(ga) == set(gb), sorted(set(ga) ^ set(gb))
        errs = {k: rel_l2(ga[k].double(), gb[k].double()) for k in sorted(ga)}
        worst = max(errs, key=errs.get)
        log(f"check: {what}: per-tensor rel-L2 max {errs[worst]:.3e} ({worst}), min {min(errs.values()):.3e}")
        assert errs[worst] < tol, (what, worst, errs[worst])
        return errs

    def save_grads(fname, lora_name, grads, loss, errs64):
        f = lora_file(lora_name)
        want = {k: tuple(v.shape) for k, v in f.items() if not k.endswith(".alpha")}
        assert want == {k: tuple(v.shape) for k, v in grads.items()}, sorted(set(want) ^ set(grads))
        for k, g in grads.items():
            assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().max() > 0, k
        assert "loss" not in grads
        tensors = {k: grads[k].contiguous() for k in sorted(grads)}
        tensors["loss"] = loss.reshape(1).to(torch.float32)
        save_st(tensors, os.path.join(out_dir, fname),
                metadata={"lora": lora_name, "multiplier": "1.0", "inputs": "tiny-inputs.safetensors",
                          "target": "tiny-grad-target.safetensors",
                          "loss": "mean((out - target)^2) over all elements"})
        back = load_file(os.path.join(out_dir, fname))
        assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
        grad_stats[fname] = (len(grads), float(loss), errs64)

    # ---- a. lora-peft.safetensors, through diffusers + PEFT itself (the model of the `peft` reference) ----
    loss32, out32, g32, _, _ = peft_grads(peft_model, "default", torch.float32)
    assert torch.equal(out32, expected["peft"]), rel_l2(out32, expected["peft"])
    with flux_rope_f64() as rope_calls:
        loss64, out64, g64, m64, leaves64 = peft_grads(copy.deepcopy(peft_model).double(), "default", torch.float64)
    assert rope_calls[0] == 2 * (NL + NS), rope_calls  # q and k of every block went through the f64 RoPE
    errs64 = compare(g32, g64, "grad peft f32 vs f64 autograd", 1e-4)
    # the same from the file, loaded by diffusers' own loader (adapter "x")
    m = FluxTransformer2DModel.from_pretrained(ddir, torch_dtype=torch.float32).eval()
    m.load_lora_adapter(out_dir, weight_name="lora-peft.safetensors", prefix="transformer", adapter_name="x")
    _, _, gx, _, _ = peft_grads(m, "x", torch.float32)
    compare(gx, g32, "grad peft via load_lora_adapter(file) vs via the reference PEFT model", 1e-6)
    del m
    # merged-weights route (W + (alpha/r) B@A, functional_call) from the file's tensors
    pf = lora_file("lora-peft.safetensors")
    md = json.loads(st_header(os.path.join(out_dir, "lora-peft.safetensors"))["__metadata__"]["lora_adapter_metadata"])
    p_scale = md["transformer.lora_alpha"] / md["transformer.r"]
    plan = [(k[len("transformer."): -len(".lora_A.weight")], k, k.replace(".lora_A.", ".lora_B."), p_scale)
            for k in sorted(pf) if k.endswith(".lora_A.weight")]
    _, _, gm = merged_grads(pf, plan, "diffusers", torch.float32)
    compare(gm, g32, "grad peft merged-weights route vs PEFT unmerged", 1e-5)
    # central finite differences in float64 on elements of different tensors (3 lora_A, 3 lora_B)
    fd_gen = torch.Generator().manual_seed(FD_SEED)
    names = sorted(leaves64)
    picks = []
    for ab in ("lora_A", "lora_B"):
        cand = [k for k in names if f".{ab}." in k]
        picks += [cand[j] for j in torch.randperm(len(cand), generator=fd_gen)[:3].tolist()]
    H = 1e-5
    with torch.no_grad(), flux_rope_f64():
        for k in picks:
            p, g = leaves64[k], g64[k]
            # a random element among those with |grad| >= 1% of the tensor's max (rel. error of ~0 is noise)
            ok = (g.abs() >= 0.01 * g.abs().max()).flatten().nonzero().flatten()
            idx = int(ok[torch.randint(len(ok), (1,), generator=fd_gen)])
            flat = p.view(-1)
            orig = flat[idx].item()
            flat[idx] = orig + H
            lp = mse_loss(model_forward(m64, inputs64), targets[torch.float64]).item()
            flat[idx] = orig - H
            lm = mse_loss(model_forward(m64, inputs64), targets[torch.float64]).item()
            flat[idx] = orig
            fd = (lp - lm) / (2 * H)
            ag64, ag32 = g.view(-1)[idx].item(), g32[k].view(-1)[idx].item()
            e64, e32 = abs(fd - ag64) / abs(ag64), abs(fd - ag32) / abs(ag32)
            log(f"check: finite difference (f64, h={H:g}) {k}[{idx}]: fd {fd:+.6e}, autograd f64 {ag64:+.6e} "
                f"(rel err {e64:.1e}), f32 {ag32:+.6e} (rel err {e32:.1e})")
            assert e64 < 1e-4, (k, idx, fd, ag64)
            assert e32 < 1e-3, (k, idx, fd, ag32)
    del m64, leaves64
    save_grads("tiny-grad-peft.safetensors", "lora-peft.safetensors", g32, loss32, errs64)

    # ---- b. lora-kohya.safetensors (BFL names, bf16 factors upcast to f32 leaves), merged BFL weights ----
    kf = lora_file("lora-kohya.safetensors")
    k_name_to_mod = {"lora_unet_" + mod.replace(".", "_"): mod for mod in bfl_mods}
    plan = []
    for k in sorted(kf):
        if k.endswith(".lora_down.weight"):
            pre = k[: -len(".lora_down.weight")]
            scale = float(kf[f"{pre}.alpha"].float()) / kf[k].shape[0]
            plan.append((k_name_to_mod[pre], k, f"{pre}.lora_up.weight", scale))
    assert len(plan) == len(kohya_mods) and {p[3] for p in plan} == {0.5}
    loss32, out32, g32 = merged_grads(kf, plan, "bfl", torch.float32)
    assert torch.equal(out32, expected["kohya"]), rel_l2(out32, expected["kohya"])
    with flux_rope_f64():
        _, _, g64 = merged_grads(kf, plan, "bfl", torch.float64)
    errs64 = compare(g32, g64, "grad kohya f32 vs f64 (same merged route)", 1e-5)
    _, _, gb = merged_grads(kf, plan, "bfl", torch.float64, route="bfl_forward")
    compare(g32, gb, "grad kohya f32 vs independent BFL-layout forward (f64)", 1e-5)
    save_grads("tiny-grad-kohya.safetensors", "lora-kohya.safetensors", g32, loss32, errs64)

    # ---- c. lora-onetrainer.safetensors (diffusers names with underscores), merged diffusers weights ----
    of = lora_file("lora-onetrainer.safetensors")
    o_name_to_mod = {"lora_transformer_" + mod.replace(".", "_"): mod for mod in diff_mods}
    plan = []
    for k in sorted(of):
        if k.endswith(".lora_down.weight"):
            pre = k[: -len(".lora_down.weight")]
            scale = float(of[f"{pre}.alpha"]) / of[k].shape[0]
            plan.append((o_name_to_mod[pre], k, f"{pre}.lora_up.weight", scale))
    assert len(plan) == len(ot_mods) and {p[3] for p in plan} == {0.5}
    loss32, out32, g32 = merged_grads(of, plan, "diffusers", torch.float32)
    assert torch.equal(out32, expected["onetrainer"]), rel_l2(out32, expected["onetrainer"])
    with flux_rope_f64():
        _, _, g64 = merged_grads(of, plan, "diffusers", torch.float64)
    errs64 = compare(g32, g64, "grad onetrainer f32 vs f64 (same merged route)", 1e-5)
    # cross-check: the same factors as a PEFT adapter (unmerged LoRA layers) on the exact modules
    m = copy.deepcopy(base_model)
    m.add_adapter(LoraConfig(r=O_R, lora_alpha=O_ALPHA, target_modules=[p[0] for p in plan]))
    assert {n for n, mod in m.named_modules() if isinstance(mod, LoraLayer)} == set(ot_mods)
    res = set_peft_model_state_dict(m, {f"{mod}.lora_{ab}.weight": of[f"{k[: -len('.lora_down.weight')]}.lora_{fk}.weight"]
                                        for mod, k, _, _ in plan for ab, fk in (("A", "down"), ("B", "up"))},
                                    adapter_name="default")
    assert not res.unexpected_keys, res.unexpected_keys
    m.eval()
    _, _, gp, _, _ = peft_grads(m, "default", torch.float32, prefix="")
    pre_of = {mod: k[: -len(".lora_down.weight")] for mod, k, _, _ in plan}
    gp = {f"{pre_of[k.rsplit('.lora_', 1)[0]]}.lora_{'down' if '.lora_A.' in k else 'up'}.weight": v
          for k, v in gp.items()}
    compare(gp, g32, "grad onetrainer via PEFT (unmerged) vs merged route", 1e-5)
    del m
    save_grads("tiny-grad-onetrainer.safetensors", "lora-onetrainer.safetensors", g32, loss32, errs64)

    # ---------------- sanity + summary ----------------
    log()
    log(f"versions: python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}")
    log(f"model: {sum(v.numel() for v in base_sd.values())} parameters, {len(base_sd)} diffusers tensors, "
        f"{len(bfl_sd)} BFL tensors")
    log(f"base output: mean {expected['base'].mean():+.4f} std {expected['base'].std():.4f} "
        f"max|.| {expected['base'].abs().max():.4f}")
    log("rel-L2 vs base:")
    for k in order[1:]:
        d = rel_l2(expected[k], expected["base"])
        log(f"  {k:12s} {d:.4f}")
        assert d > 0.01, f"LoRA {k} barely changes the output ({d})"
    # float32 round-off floor: the same references recomputed in float64 (not stored)
    inputs64 = {k: v.double() for k, v in inputs.items()}
    log("f32 reference vs the same computation in f64, rel-L2 (round-off floor for tolerances):")
    for k in order:
        out64 = run_model(copy.deepcopy(ref_models[k]).double(), inputs64)
        log(f"  {k:12s} {rel_l2(expected[k].double(), out64):.3e}")
    log("golden LoRA gradients (L = mean((out - target)^2) over all 256 elements, LoRA at multiplier 1.0);")
    log("rel-L2 of the stored f32 gradients vs the same autograd in f64, per tensor:")
    for fname, (n, loss, errs) in grad_stats.items():
        worst = max(errs, key=errs.get)
        log(f"  {fname:34s} {n:3d} tensors  loss {loss:.6f}  rel-L2 max {errs[worst]:.3e} min {min(errs.values()):.3e}")
        log(f"  {'':34s} worst: {worst}")
    # every file must still load (headers were rewritten) and be < 1 MB in total
    for root, _, files in os.walk(out_dir):
        for fn in files:
            if fn.endswith(".safetensors"):
                assert len(load_file(os.path.join(root, fn))) > 0, fn
    log("files:")
    total = 0
    for root, _, files in sorted(os.walk(out_dir)):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            if os.path.relpath(p, out_dir) == "README.md":
                continue
            sz = os.path.getsize(p)
            total += sz
            log(f"  {os.path.relpath(p, out_dir):68s} {sz:8d} B")
    log(f"  total {total} B (README.md not counted)")
    assert total < 1_000_000, total
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(README_TEMPLATE.replace("@SUMMARY@", "\n".join(summary)))
    print(f"wrote {os.path.join(out_dir, 'README.md')}")


if __name__ == "__main__":
    main()
