#!/usr/bin/env python3
"""The engine's whole sampling pipeline against diffusers' FluxPipeline on the same folder (issue 16 §5).

    .toolchain/torch-venv/bin/python tools/compare_diffusers_pipeline.py \
        [--model tests/fixtures/pipeline] [--bin target/debug/flux-kernels] [--steps 4] [--size 32]

Draws the initial noise once in the layout FluxPipeline draws it ([1, C, h, w] before packing),
gives the same noise to both (`sample --noise`, `FluxPipeline(latents=packed noise)`), and compares
what comes out: the final latents (`sample --latents-out` against `output_type="latent"`, unpacked)
and the decoded pixels (the engine's PNG against diffusers' image rounded to 8 bits). Text
encoders, the shifted Euler schedule (dynamic shifting from the image's token count), guidance,
the transformer and the VAE are all in that chain. Needs torch, diffusers, transformers,
sentencepiece and protobuf (the T5 tokenizer); prints one line per comparison and exits 1 when
the latents differ by more than --tol relative L2.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(root, "tests", "fixtures", "pipeline"))
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target")), "debug", "flux-kernels"))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--prompt", default="a red cube on a table")
    ap.add_argument("--t5-max-len", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.transformer.config.in_channels // 4
    side = 2 * (a.size // (pipe.vae_scale_factor * 2))
    noise = torch.randn(1, c, side, side, generator=torch.Generator().manual_seed(a.seed), dtype=torch.float32)
    packed = pipe._pack_latents(noise, 1, c, side, side)
    common = dict(prompt=a.prompt, height=a.size, width=a.size, num_inference_steps=a.steps,
                  guidance_scale=a.guidance, max_sequence_length=a.t5_max_len)
    lat = pipe(**common, latents=packed.clone(), output_type="latent").images
    ref_lat = pipe._unpack_latents(lat, a.size, a.size, pipe.vae_scale_factor)
    ref_img = pipe(**common, latents=packed.clone(), output_type="np").images[0]  # [H, W, 3] in [0, 1]

    with tempfile.TemporaryDirectory() as tmp:
        nz = os.path.join(tmp, "noise.safetensors")
        save_file({"noise": noise.contiguous()}, nz)
        out = os.path.join(tmp, "out")
        lo = os.path.join(tmp, "final.safetensors")
        cmd = [a.bin, "sample", "--model", a.model, "--prompt", a.prompt, "--width", str(a.size),
               "--height", str(a.size), "--steps", str(a.steps), "--guidance", str(a.guidance),
               "--t5-max-len", str(a.t5_max_len), "--noise", nz, "--latents-out", lo, "--out", out,
               "--device", "cpu", "--no-nsfw-check"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            sys.exit(f"flux-kernels sample failed (exit {r.returncode})")
        ours = load_file(lo)
        got = next(iter(ours.values())).numpy()
        pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
        img = np.asarray(Image.open(os.path.join(out, pngs[0])).convert("RGB"), np.float64)

    want = ref_lat.numpy()
    e_lat = rel_l2(got.reshape(want.shape), want)
    ref8 = np.round(np.clip(ref_img, 0, 1) * 255.0)
    diff = np.abs(img - ref8)
    print(f"model {a.model}, {a.size}², {a.steps} steps, guidance {a.guidance}, noise {tuple(noise.shape)}")
    print(f"final latents: rel L2 {e_lat:.2e} (engine vs FluxPipeline, same noise)")
    print(f"decoded pixels (8-bit): max |diff| {diff.max():.0f}, mean {diff.mean():.3f}, rel L2 {rel_l2(img, ref8):.2e}")
    sys.exit(0 if e_lat <= a.tol else 1)


if __name__ == "__main__":
    main()
