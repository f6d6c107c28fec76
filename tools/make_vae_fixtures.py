#!/usr/bin/env python3
"""Golden fixtures of the FLUX autoencoder (tests/fixtures/vae/, tests/fixtures/pipeline/vae/).

A tiny diffusers `AutoencoderKL` with FLUX's structure (no quant_conv / post_quant_conv, mid attention, scale
0.3611 / shift 0.1159) and random weights, written twice: as a diffusers folder and, converted by hand, as a
BFL `ae.safetensors`; plus its outputs, computed by diffusers in float32 on the CPU.

Regenerate from the repository root (torch, diffusers >= 0.30, safetensors, numpy; 0.42.1 was used):

    python tools/make_vae_fixtures.py

Conventions:
  * Every parameter is rounded to bf16 before the references are computed, so the bf16 files hold exactly
    the weights the references were computed with (in float32).
  * Random weights: GroupNorm scale 1 + N(0, 0.2^2), shift N(0, 0.2^2); conv / linear weights
    N(0, gain^2 / fan_in) with gain 1.5 (0.7 for the attention q and k, so the softmax is neither flat nor
    one-hot); biases N(0, 0.1^2). Activations stay O(1) through the GroupNorms; `conv_out` gets gain 1 so the
    latent mean and logvar are O(1).
  * BFL names from diffusers names: docs/flux-model.md §8.3 (down_blocks.i.resnets.j ->
    down.i.block.j, conv_shortcut -> nin_shortcut, up_blocks.i -> up.(L-1-i), mid_block.attentions.0.{group_norm,
    to_q,to_k,to_v,to_out.0} -> mid.attn_1.{norm,q,k,v,proj_out} with the Linear weights unsqueezed to 1x1 convs
    [C,C,1,1], conv_norm_out -> norm_out, downsamplers.0 -> downsample, upsamplers.0 -> upsample). Checked
    against diffusers' own `convert_ldm_vae_checkpoint` (BFL -> diffusers), which must give back the diffusers
    state dict bit for bit.
  * The BFL file carries `__metadata__` {"norm_num_groups": "4"}: GroupNorm's group count is not visible in
    any shape, and the Rust loader defaults to FLUX's 32 otherwise.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

SEED = 20250611
CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=2,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def randomize(model, gen):
    sd = model.state_dict()
    new = {}
    for name, t in sd.items():
        if "norm" in name:  # every GroupNorm: norm1, norm2, group_norm, conv_norm_out
            v = (1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(t.shape, generator=gen)
        elif name.endswith("bias"):
            v = 0.1 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = int(np.prod(t.shape[1:]))
            gain = 1.5
            if "to_q" in name or "to_k" in name:
                gain = 0.7
            if name.endswith("conv_out.weight"):
                gain = 1.0
            v = gain / np.sqrt(fan_in) * torch.randn(t.shape, generator=gen)
        new[name] = bf16(v)
    model.load_state_dict(new)
    return new


def to_bfl(sd, levels):
    """diffusers AutoencoderKL state dict -> BFL ae.safetensors names and shapes."""
    out = {}
    for name, t in sd.items():
        parts = name.split(".")
        n = name
        if ".down_blocks." in n:
            i = parts[2]
            n = n.replace(f"down_blocks.{i}.resnets.", f"down.{i}.block.")
            n = n.replace(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample.")
        if ".up_blocks." in n:
            i = int(parts[2])
            k = levels - 1 - i
            n = n.replace(f"up_blocks.{i}.resnets.", f"up.{k}.block.")
            n = n.replace(f"up_blocks.{i}.upsamplers.0.", f"up.{k}.upsample.")
        n = n.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        attn = "mid_block.attentions.0."
        for d, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            n = n.replace(attn + d + ".", "mid.attn_1." + b + ".")
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid.attn_1." in n and n.endswith("weight") and not n.endswith("norm.weight"):
            t = t[:, :, None, None]
        assert n not in out, n
        out[n] = t
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = AutoencoderKL(**CONFIG).eval()
    sd = randomize(model, gen)
    levels = len(CONFIG["block_out_channels"])

    bfl = to_bfl(sd, levels)
    back = convert_ldm_vae_checkpoint(bfl, dict(model.config))
    assert sorted(back) == sorted(sd), (sorted(set(back) ^ set(sd)))
    for k in sd:
        assert torch.equal(back[k].reshape(sd[k].shape), sd[k]) and back[k].shape == sd[k].shape, k

    # Inputs: a smooth pattern plus noise in [-1, 1], and a latent ~ N(0, 1).
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    img = torch.stack([torch.sin(3 * xs + 1), torch.cos(2 * ys - xs), xs * ys])[None]
    img = (0.8 * img + 0.2 * (2 * torch.rand(img.shape, generator=gen) - 1)).clamp(-1, 1)
    z_in = torch.randn(1, 2, 8, 8, generator=gen)

    sf, sh = CONFIG["scaling_factor"], CONFIG["shift_factor"]
    with torch.no_grad():
        dist = model.encode(img).latent_dist
        latent_mean = (dist.mean - sh) * sf
        latent_logvar = dist.logvar
        decoded = model.decode(z_in / sf + sh).sample

    out = args.out
    pipe = os.path.join(out, "pipeline", "vae")
    vae = os.path.join(out, "vae")
    shutil.rmtree(pipe, ignore_errors=True)
    os.makedirs(pipe)
    os.makedirs(vae, exist_ok=True)
    model.save_pretrained(pipe, safe_serialization=True)
    # save_pretrained writes what the model holds (float32); store bf16 like the real checkpoint.
    dsd = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
    save_file(dsd, os.path.join(pipe, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in bfl.items()},
        os.path.join(vae, "ae.safetensors"),
        metadata={"norm_num_groups": str(CONFIG["norm_num_groups"])},
    )
    save_file(
        {
            "img": img.contiguous(),
            "latent_mean": latent_mean.contiguous(),
            "latent_logvar": latent_logvar.contiguous(),
            "z_in": z_in.contiguous(),
            "decoded": decoded.contiguous(),
        },
        os.path.join(vae, "expected.safetensors"),
    )

    # The folder must load back in diffusers and give the same outputs.
    re = AutoencoderKL.from_pretrained(pipe).eval()
    with torch.no_grad():
        assert torch.equal((re.encode(img).latent_dist.mean - sh) * sf, latent_mean)
        assert torch.equal(re.decode(z_in / sf + sh).sample, decoded)

    nparams = sum(v.numel() for v in sd.values())
    print(f"params {nparams} in {len(sd)} tensors")
    for name, t in (("img", img), ("latent_mean", latent_mean), ("logvar", latent_logvar), ("decoded", decoded)):
        print(f"{name:12s} {tuple(t.shape)} mean {t.mean():+.4f} std {t.std():.4f} absmax {t.abs().max():.4f}")
    for root in (pipe, vae):
        for f in sorted(os.listdir(root)):
            print(f"{os.path.join(root, f)}: {os.path.getsize(os.path.join(root, f))} bytes")
    print(json.dumps({"torch": torch.__version__, "diffusers": __import__("diffusers").__version__}))


if __name__ == "__main__":
    main()
