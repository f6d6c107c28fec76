#!/usr/bin/env python3
"""The PyTorch baseline for issue #6's side-by-side: one FLUX.1-dev LoRA training step through
diffusers' FluxTransformer2DModel (random init, the FLUX.1-dev config) with a PEFT LoRA on the
same targets as flux-kernels' default `attn-mlp` preset, bf16 weights, torch SDPA, AdamW on the
LoRA parameters, batch 1. Reports step time (median of CUDA-event-timed steps after warm-up) and
peak GPU memory (torch.cuda.max_memory_allocated / _reserved) per resolution, with and without
gradient checkpointing. Prints a markdown table; --out writes it too.

The GPU machines have torch and peft but no diffusers: carry the wheels in .whl/ (git-ignored;
see docs/side-by-side.md for the download command) and install them with
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site python3 tools/torch_flux_lora_step.py
`--config tiny` runs the same code on a 2-block toy model (CPU smoke test, no GPU needed).

`--sdpa flash` (the default) pins SDPA to the FlashAttention-2 backend: with PyTorch's own
backend choice the first backward died with "CUDA error: an illegal memory access" on an H200
(torch 2.11.0+cu130, diffusers 0.42.1, peft 0.21.0, 2026-11-28; docs/gpu-runs.md run 6).
"""
import argparse
import statistics
import time

import torch

# flux-kernels' `attn-mlp` preset (src/adapters/config.rs ATTN + MLP), PEFT suffix matching.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

FLUX1_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build(cfg, dev, rank, ckpt):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = FluxTransformer2DModel(**cfg)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    # PEFT creates the adapters in the model's dtype; trainers keep LoRA weights in f32 (kohya,
    # diffusers' example upcasts them), as flux-kernels does.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    return model, params


def inputs(cfg, res, dev, txt_tokens):
    lat = res // 16  # VAE /8, then 2×2 patches
    n_img = lat * lat
    c = cfg["in_channels"]
    g = torch.Generator(device="cpu").manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, torch.bfloat16)
    ii, jj = torch.meshgrid(torch.arange(lat), torch.arange(lat), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(ii), ii, jj], -1).reshape(-1, 3).float().to(dev)
    return dict(hidden_states=rnd(1, n_img, c), encoder_hidden_states=rnd(1, txt_tokens, cfg["joint_attention_dim"]),
                pooled_projections=rnd(1, cfg["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=dev, dtype=torch.bfloat16),
                img_ids=img_ids, txt_ids=torch.zeros(txt_tokens, 3, device=dev),
                guidance=torch.tensor([3.5], device=dev, dtype=torch.bfloat16)), rnd(1, n_img, c)


def step(model, opt, x, target):
    out = model(**x, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), target.float())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="flux1-dev", choices=["flux1-dev", "tiny"])
    ap.add_argument("--res", default="512,1024")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--txt-tokens", type=int, default=512)
    ap.add_argument("--ckpt", default="1,0", help="gradient checkpointing settings to run, in order")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; skip the remaining rows after it")
    ap.add_argument("--sdpa", default="flash", choices=["flash", "cudnn", "efficient", "math", "auto"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                  efficient=SDPBackend.EFFICIENT_ATTENTION, math=SDPBackend.MATH)[args.sdpa]
        with sdpa_kernel([be]):
            return run(args)
    return run(args)


def run(args):
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = FLUX1_DEV if args.config == "flux1-dev" else TINY
    t0 = time.time()
    import diffusers
    import peft
    name = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [f"PyTorch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__} on {name}: "
             f"FluxTransformer2DModel ({args.config}, random init, bf16), PEFT LoRA r = {args.rank} on attn-mlp "
             f"targets (f32 adapters), AdamW, torch SDPA ({args.sdpa}), batch 1, {args.txt_tokens} text tokens; median of "
             f"{args.steps} steps after {args.warm} warm-up.", "",
             "| resolution | image tokens | gradient checkpointing | step (s) | peak allocated (GiB) | peak reserved (GiB) |",
             "|---|---|---|---|---|---|"]
    for ck in [c == "1" for c in args.ckpt.split(",")]:
        model, params = build(cfg, dev, args.rank, ck)
        opt = torch.optim.AdamW(params, lr=1e-4)
        n_train = sum(p.numel() for p in params)
        for res in [int(r) for r in args.res.split(",")]:
            if time.time() - t0 > args.budget:
                lines.append(f"| {res}² | | {'on' if ck else 'off'} | skipped: --budget {args.budget:.0f} s spent | | |")
                continue
            x, target = inputs(cfg, res, dev, args.txt_tokens)
            try:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                for _ in range(args.warm):
                    step(model, opt, x, target)
                times = []
                for _ in range(args.steps):
                    if cuda:
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record()
                        step(model, opt, x, target)
                        b.record()
                        b.synchronize()
                        times.append(a.elapsed_time(b) / 1e3)
                    else:
                        s = time.perf_counter()
                        step(model, opt, x, target)
                        times.append(time.perf_counter() - s)
                gib = 2.0 ** 30
                pa = torch.cuda.max_memory_allocated() / gib if cuda else float("nan")
                pr = torch.cuda.max_memory_reserved() / gib if cuda else float("nan")
                lines.append(f"| {res}² | {(res // 16) ** 2} | {'on' if ck else 'off'} | {statistics.median(times):.3f} | "
                             f"{pa:.2f} | {pr:.2f} |")
            except torch.OutOfMemoryError as e:
                lines.append(f"| {res}² | {(res // 16) ** 2} | {'on' if ck else 'off'} | out of memory: "
                             f"{str(e).splitlines()[0][:60]} | | |")
            print(lines[-1], flush=True)
            del x, target
        print(f"(trainable parameters: {n_train:,})", flush=True)
        del model, params, opt
        if cuda:
            torch.cuda.empty_cache()
    lines.append("")
    lines.append(f"Trainable LoRA parameters: {n_train:,}. Whole script {time.time() - t0:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
