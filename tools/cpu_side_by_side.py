#!/usr/bin/env python3
"""The CPU path against PyTorch (diffusers + PEFT) on the CPU, side by side in one run (issue 23).

For each size it builds one random diffusers FluxTransformer2DModel (f32, saved as a diffusers
folder), one PEFT LoRA on the attention and MLP linears, inputs and a target; then times, with the
same thread count on both sides, each side in its own process (so its peak RSS is its own):
  forward    the model with the LoRA applied (no gradient)
  grad       forward + backward of mean((out - target)^2) to the LoRA factors
  step       grad + AdamW over the LoRA factors
Both sides read the same files. Before timing, the engine's `grad` output is compared with
PyTorch's gradient (relative L2), so the two do the same work.

  python3 -m venv .toolchain/torch-venv && .toolchain/torch-venv/bin/pip install torch diffusers peft
  cargo build --release
  .toolchain/torch-venv/bin/python tools/cpu_side_by_side.py [--threads 2] [--repeat 7] [--warmup 3] [--rounds 3]

Prints a markdown table (times: the best of the rounds' medians; ratio = PyTorch time / engine time).
"""
import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile

SIZES = {
    # name: (double blocks, single blocks, heads, head dim, image tokens, text tokens, T5 width)
    "small": (2, 4, 2, 128, 256, 64, 256),
    "medium": (4, 8, 4, 128, 1024, 128, 512),
}
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
]
RANK = 16


def build(size, folder):
    """Random model folder, LoRA, inputs and target for one size (seeded, so reruns agree)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    nd, ns, heads, hd, n_img, n_txt, ctx = SIZES[size]
    torch.manual_seed(0)
    cfg = dict(patch_size=1, in_channels=64, num_layers=nd, num_single_layers=ns, attention_head_dim=hd,
               num_attention_heads=heads, joint_attention_dim=ctx, pooled_projection_dim=128,
               guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = FluxTransformer2DModel(**cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape) * 0.02)
            else:
                p.copy_(1.0 + torch.randn(p.shape) * 0.1)
    model.save_pretrained(os.path.join(folder, "model"), safe_serialization=True)
    lc = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False)
    model.add_adapter(lc)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape) * (0.02 if "lora_B" in name else 1.0 / math.sqrt(p.shape[1])))
    sd = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": RANK})}
    save_file(sd, os.path.join(folder, "lora.safetensors"), metadata=meta)
    side = int(math.isqrt(n_img))
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = {
        "img": torch.randn(1, n_img, 64), "img_ids": ids.reshape(-1, 3), "txt": torch.randn(1, n_txt, ctx) * 0.2,
        "txt_ids": torch.zeros(n_txt, 3), "y": torch.randn(1, 128) * 0.5, "timesteps": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
    }
    save_file(inputs, os.path.join(folder, "inputs.safetensors"))
    save_file({"target": torch.randn(1, n_img, 64)}, os.path.join(folder, "target.safetensors"))


def torch_side(folder, threads, repeat, warmup):
    """Runs in its own process: the PyTorch timings (seconds, medians) and the LoRA gradient."""
    import time
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    model = FluxTransformer2DModel.from_pretrained(os.path.join(folder, "model"), torch_dtype=torch.float32)
    model.load_lora_adapter(os.path.join(folder, "lora.safetensors"), prefix="transformer")
    model.eval()
    x = load_file(os.path.join(folder, "inputs.safetensors"))
    target = load_file(os.path.join(folder, "target.safetensors"))["target"]
    kw = dict(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
              timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
              return_dict=False)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            params.append((name, p))
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def timed(f):
        t = []
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                t.append(time.perf_counter() - t0)
        return sorted(t)[len(t) // 2]

    def fwd():
        with torch.inference_mode():
            model(**kw)

    def grad():
        opt.zero_grad(set_to_none=False)
        loss = ((model(**kw)[0] - target) ** 2).mean()
        loss.backward()

    def step():
        grad()
        opt.step()

    out = {"forward_s": timed(fwd), "grad_s": timed(grad)}
    grads = {"transformer." + re.sub(r"\.default(_\d+)?\.", ".", n): p.grad.clone() for n, p in params}
    out["step_s"] = timed(step)
    torch.save(grads, os.path.join(folder, "torch-grads.pt"))
    return out


def child_peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_measured(cmd, env=None):
    """Runs cmd in a fresh process; returns (stdout, its peak RSS in MiB) via a wrapper process
    whose own RUSAGE_CHILDREN holds only that one child."""
    wrap = ("import resource,subprocess,sys,json;r=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "sys.stderr.write(r.stderr);"
            "print(json.dumps({'rc':r.returncode,'out':r.stdout,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    r = subprocess.run([sys.executable, "-c", wrap, *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} wrapper failed: {r.stderr}")
    j = json.loads(r.stdout.strip().splitlines()[-1])
    if j["rc"] != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {j['rc']}): {r.stderr}")
    return j["out"], j["rss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the best median counts")
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--engine", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "flux-kernels"))
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    ap.add_argument("--torch-side", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_side:
        print(json.dumps(torch_side(a.torch_side, a.threads, a.repeat, a.warmup)))
        return
    import torch

    work = a.work or tempfile.mkdtemp(prefix="fk-cpu-sbs-")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    rows = []
    for size in a.sizes.split(","):
        folder = os.path.join(work, size)
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(os.path.join(folder, "target.safetensors")):
            build(size, folder)
        f = lambda n: os.path.join(folder, n)
        # Same work on both sides: the engine's gradient against PyTorch's.
        subprocess.run([a.engine, "grad", "--device", "cpu", "--model", f("model"), "--inputs", f("inputs.safetensors"),
                        "--target", f("target.safetensors"), "--lora", f("lora.safetensors"),
                        "--out", f("engine-grads.safetensors")], check=True, capture_output=True, env=env)
        # Rounds alternate the two sides; each side's figure is its best round's median, so a
        # burst of load from elsewhere on the machine does not decide the ratio.
        t, e, trss, erss = {}, {}, 0.0, 0.0
        for _ in range(a.rounds):
            tout, rss = run_measured([sys.executable, __file__, "--torch-side", folder, "--threads", str(a.threads),
                                      "--repeat", str(a.repeat), "--warmup", str(a.warmup)], env=env)
            trss = max(trss, rss)
            for key, v in json.loads(tout.strip().splitlines()[-1]).items():
                t[key] = min(t.get(key, math.inf), v)
            eout, rss = run_measured([a.engine, "bench-cpu", "--model", f("model"), "--inputs", f("inputs.safetensors"),
                                      "--target", f("target.safetensors"), "--lora", f("lora.safetensors"),
                                      "--threads", str(a.threads), "--repeat", str(a.repeat), "--warmup", str(a.warmup)],
                                     env=env)
            erss = max(erss, rss)
            for key, v in json.loads(eout.strip().splitlines()[-1]).items():
                if key.endswith("_s"):
                    e[key] = min(e.get(key, math.inf), v)
        from safetensors.torch import load_file
        eg = load_file(f("engine-grads.safetensors"))
        tg = torch.load(f("torch-grads.pt"))
        num = sum(float(((eg[k] - tg[k]) ** 2).sum()) for k in tg)
        den = sum(float((tg[k] ** 2).sum()) for k in tg)
        missing = [k for k in tg if k not in eg]
        if missing:
            sys.exit(f"engine gradient lacks {missing[:3]}")
        err = math.sqrt(num / den)
        for case in ("forward", "grad", "step"):
            rows.append((size, case, e[f"{case}_s"], t[f"{case}_s"], erss, trss, err))
    print(f"threads {a.threads}, {a.rounds} rounds of {a.warmup} warm-up + {a.repeat} timed runs (best round's median), torch {torch.__version__}, rank {RANK}, f32 weights\n")
    print("| size | case | engine | PyTorch | ratio (PyTorch/engine) | engine peak RSS | PyTorch peak RSS | grad rel. L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for size, case, et, tt, erss, trss, err in rows:
        print(f"| {size} | {case} | {et * 1e3:.1f} ms | {tt * 1e3:.1f} ms | {tt / et:.2f} | {erss:.0f} MiB | {trss:.0f} MiB | {err:.1e} |")


if __name__ == "__main__":
    main()
