#!/usr/bin/env python3
"""Reference LoRA parameter counts from PEFT itself -> tests/fixtures/peft-trainable.json.

For diffusers' `FluxTransformer2DModel` (the FLUX.1-dev config, and the tiny config of tests/fixtures/tiny-diffusers)
this adds a LoRA adapter with `peft.get_peft_model(model, peft.LoraConfig(...))` and records the exact line that
`PeftModel.print_trainable_parameters()` prints:

    trainable params: N || all params: M || trainable%: P

The FLUX.1-dev model is built on the `meta` device (no real memory, no weights needed: counts depend only on
shapes); adapter injection also runs under `torch.device("meta")`, so the LoRA factors are meta tensors too. The
tiny model is built for real on the CPU from tests/fixtures/tiny-diffusers/config.json.

Each count is cross-checked against an independent computation: sum over the nn.Linear modules whose name equals
a target or ends with "." + target of r_eff * (in_features + out_features), where r_eff comes from rank_pattern
(same suffix rule) or r; "all params" = base parameters + trainable.

lora_alpha does not change any count; it is recorded as lora_alpha = r (the diffusers training scripts' default).

Run from the repository root (needs torch, diffusers, peft; no GPU):

    python tools/peft_counts.py [--out tests/fixtures/peft-trainable.json]
"""

import argparse
import contextlib
import io
import json
import os
import re
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLUX1_DEV_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# diffusers examples/dreambooth/train_dreambooth_lora_flux.py default --lora_layers
DREAMBOOTH_DEFAULT = [
    "to_k", "to_q", "to_v", "to_out.0",
    "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]
ATTN_ONLY = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
EVERYTHING = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear",
]

# (r, target_modules, rank_pattern)
CASES = [
    (16, DREAMBOOTH_DEFAULT, {}),
    (4, ATTN_ONLY, {}),
    (32, EVERYTHING, {}),  # "proj_out" also matches the top-level proj_out (PEFT suffix rule)
    (8, ["to_q", "to_v"], {"to_v": 64}),
    (128, DREAMBOOTH_DEFAULT, {}),
]

LINE_RE = re.compile(r"^trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})$")


def suffix_match(name, key):
    return name == key or name.endswith("." + key)


def expected_counts(model, r, targets, rank_pattern):
    """Independent count: (trainable, all) for LoRA on `model` (a model without an adapter)."""
    base = sum(p.numel() for p in model.parameters())
    trainable = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if not any(suffix_match(name, t) for t in targets):
            continue
        rr = r
        for key, val in rank_pattern.items():
            if suffix_match(name, key):
                rr = val
                break
        trainable += rr * (mod.in_features + mod.out_features)
    return trainable, base + trainable


def peft_line(build, r, targets, rank_pattern, device_ctx):
    from peft import LoraConfig, get_peft_model

    with device_ctx():
        model = build()
    exp_trainable, exp_all = expected_counts(model, r, targets, rank_pattern)
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=list(targets),
        rank_pattern=dict(rank_pattern),
        init_lora_weights=True,
    )
    with device_ctx():
        pm = get_peft_model(model, cfg)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        pm.print_trainable_parameters()
    line = buf.getvalue().strip()
    m = LINE_RE.match(line)
    assert m, f"unexpected print_trainable_parameters output: {line!r}"
    got_trainable = int(m.group(1).replace(",", ""))
    got_all = int(m.group(2).replace(",", ""))
    assert (got_trainable, got_all) == (exp_trainable, exp_all), (
        f"PEFT says {got_trainable}/{got_all}, independent count {exp_trainable}/{exp_all} (r={r}, {targets})"
    )
    # the rank_pattern must actually have been applied
    for name, mod in pm.named_modules():
        if hasattr(mod, "r") and isinstance(getattr(mod, "r"), dict) and "default" in mod.r:
            want = next((v for k, v in rank_pattern.items() if suffix_match(name.split("base_model.model.", 1)[-1], k)), r)
            assert mod.r["default"] == want, (name, mod.r["default"], want)
    del pm, model
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "peft-trainable.json"))
    args = ap.parse_args()

    import diffusers
    import peft
    from diffusers import FluxTransformer2DModel

    tiny_cfg_path = os.path.join(REPO, "tests", "fixtures", "tiny-diffusers", "config.json")
    with open(tiny_cfg_path) as f:
        tiny_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}

    models = [
        ("flux1-dev", lambda: FluxTransformer2DModel(**FLUX1_DEV_CONFIG), lambda: torch.device("meta")),
        ("tiny", lambda: FluxTransformer2DModel(**tiny_cfg), contextlib.nullcontext),
    ]

    cases = []
    for model_name, build, device_ctx in models:
        for r, targets, rank_pattern in CASES:
            line = peft_line(build, r, targets, rank_pattern, device_ctx)
            print(f"{model_name:9s} r={r:<3d} rank_pattern={rank_pattern}: {line}", file=sys.stderr)
            cases.append(
                {
                    "model": model_name,
                    "r": r,
                    "lora_alpha": r,
                    "target_modules": list(targets),
                    "rank_pattern": dict(rank_pattern),
                    "line": line,
                }
            )

    doc = {
        "peft_version": peft.__version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "generator": "tools/peft_counts.py (PeftModel.print_trainable_parameters() output, captured verbatim)",
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
