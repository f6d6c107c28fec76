#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention at the shapes of benches/attention.rs, on the same GPU
in the same device call (tools/gpu-run.sh runs both), so the two tables compare directly.

b = 1, 24 heads x 128, l = 1536 and 4608, bf16, no mask; each SDPA backend PyTorch has
(flash, cuDNN, memory-efficient, math = materialised softmax) forced in turn. Forward and
forward+backward are timed with CUDA events (median of --reps calls after warm-up), the backward
as their difference; TFLOP/s use the FlashAttention convention (forward 4*h*l^2*d, backward 2.5x).
Needs only torch (the GPU machine has it). Prints a markdown table; --out also writes it.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, warm, reps):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="1536,4608")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lines = [
        f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}: F.scaled_dot_product_attention, "
        f"b = 1, {args.heads} heads x 128, bf16, no mask; median of {args.reps} calls, ms (TFLOP/s).",
        "",
        "| l | backend | fwd | bwd (fwd+bwd - fwd) | fwd+bwd |",
        "|---|---|---|---|---|",
    ]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION), ("math (materialised)", SDPBackend.MATH)]
    for l in [int(x) for x in args.lens.split(",")]:
        d = 128
        ff = 4.0 * args.heads * l * l * d
        bf = 2.5 * ff
        q, k, v = (torch.randn(1, args.heads, l, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn(1, args.heads, l, d, device=dev, dtype=torch.bfloat16)
        for name, be in backends:
            try:
                with sdpa_kernel(be):
                    def fwd():
                        with torch.no_grad():
                            F.scaled_dot_product_attention(q, k, v)

                    def both():
                        o = F.scaled_dot_product_attention(q, k, v)
                        torch.autograd.grad(o, (q, k, v), do)

                    tf = median_ms(fwd, 3, args.reps)
                    tb = median_ms(both, 3, args.reps)
                bw = tb - tf
                lines.append(f"| {l} | {name} | {tf:.3f} ({ff / tf / 1e9:.0f}) | {bw:.3f} ({bf / bw / 1e9:.0f}) | "
                             f"{tb:.3f} ({(ff + bf) / tb / 1e9:.0f}) |")
            except Exception as e:  # a backend this build or card lacks: say so, keep going
                lines.append(f"| {l} | {name} | not available: {str(e).splitlines()[0][:80]} | | |")
            torch.cuda.empty_cache()
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
