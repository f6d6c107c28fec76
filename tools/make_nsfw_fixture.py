#!/usr/bin/env python3
"""Golden fixture of the NSFW classifier (src/safety/, tests/nsfw.rs): a tiny random
`ViTForImageClassification` in the layout of Falconsai/nsfw_image_detection, with transformers'
own preprocessing and outputs. No hub download: everything is built here.

The model: hidden 32, 2 layers, 4 heads, intermediate 64, image 32x32, patch 8 (16 patches + CLS),
labels {0: normal, 1: nsfw}, hidden_act gelu (erf), layer_norm_eps 1e-12 (Falconsai's), qkv_bias.
Random weights large enough to move the output (Linear/conv weights ~ N(0, 1/fan_in), biases
~ N(0, 0.05^2), LayerNorm weights 1 + N(0, 0.1^2) and biases N(0, 0.1^2), cls/position ~ N(0, 0.5^2),
classifier ~ N(0, 9/fan_in)); then the classifier's nsfw bias is shifted so that one input image is
flagged (p >= 0.85) and the other is not, and every parameter is rounded to bf16, so the bf16 file
holds exactly the weights the references were computed with (float32, eval mode).

Outputs under tests/fixtures/nsfw/:
  model/config.json, model/model.safetensors (bf16, save_pretrained's names),
  model/preprocessor_config.json   Falconsai's settings (ViTImageProcessor, resample 2 = BILINEAR,
                                   rescale 1/255, mean = std = 0.5) with size 32x32 for the tiny model
  wide.png (320x240) and small.png (37x23): the input images (8-bit RGB)
  wide-224.png, small-224.png: the 8-bit image transformers' ViTImageProcessor (PIL backend) feeds a
                                   224x224 model (Falconsai's size): its pixel_values mapped back to
                                   bytes, checked equal to PIL's Image.resize((224, 224), BILINEAR)
  expected.safetensors (f32):
      pixel_values.wide, pixel_values.small [1,3,32,32]  the processor's output for the tiny model
      logits.wide, logits.small [1,2], probs.wide, probs.small [1,2]  softmax(logits)
      random_pixels [2,3,32,32] ~ N(0,1), logits.random [2,2]  the model alone, no preprocessing
  metadata: transformers/torch/PIL versions.

With --vit-b16 DIR it also writes a random ViT-B/16 of Falconsai's exact config (HF's own init, f32,
343 MB) to DIR with a 224x224 test image and transformers' logits for it (DIR/expected.safetensors),
and prints transformers' CPU time per image; tests/nsfw.rs's ignored test
`vit_b16_time_and_agreement` reads it (FK_NSFW_VIT_B16=DIR).

Regenerate from the repository root (torch, transformers >= 5, safetensors, Pillow, numpy):

    /work/main/.toolchain/torch-venv/bin/python tools/make_nsfw_fixture.py
"""

import argparse
import json
import os
import time

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification

try:  # transformers >= 5 names the PIL backend explicitly
    from transformers import ViTImageProcessorPil as Processor
except ImportError:  # transformers 4: ViTImageProcessor is the PIL one
    from transformers import ViTImageProcessor as Processor

SEED = 20261203
OUT = os.path.join("tests", "fixtures", "nsfw")
THRESHOLD = 0.85
FALCONSAI_PROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}


def input_images(g):
    """A wide image with structure (gradients, stripes, noise: the downscale averages them) and a
    small random one (the upscale interpolates it)."""
    h, w = 240, 320
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    gch = 255 * x / w
    b = 255 * ((x // 3 + y // 5) % 2)
    wide = np.stack([r, gch, b], -1)
    wide = np.clip(np.round(wide), 0, 255).astype(np.uint8)
    small = torch.randint(0, 256, (23, 37, 3), generator=g, dtype=torch.uint8).numpy()
    return {"wide": wide, "small": small}


def tiny_model(g):
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "layernorm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("cls_token") or name.endswith("position_embeddings"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                scale = 3.0 if name.startswith("classifier") else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in**0.5)
    return model


def round_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def logits_of(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vit-b16", metavar="DIR", help="also write a random ViT-B/16 (Falconsai's config) to DIR")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    os.makedirs(os.path.join(OUT, "model"), exist_ok=True)

    images = input_images(g)
    for name, img in images.items():
        Image.fromarray(img).save(os.path.join(OUT, f"{name}.png"))

    # Falconsai's processor at 224: the bytes the model would see, checked against PIL directly.
    proc224 = Processor(**{k: v for k, v in FALCONSAI_PROCESSOR.items() if k != "image_processor_type"})
    for name, img in images.items():
        pv = proc224(images=Image.fromarray(img), return_tensors="pt").pixel_values[0]
        back = np.round((pv.numpy().transpose(1, 2, 0) * 0.5 + 0.5) * 255).astype(np.uint8)
        pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
        assert (back == pil).all(), f"{name}: the processor's 224 input is not PIL's bilinear resize"
        Image.fromarray(back).save(os.path.join(OUT, f"{name}-224.png"))

    proc = Processor(**{**{k: v for k, v in FALCONSAI_PROCESSOR.items() if k != "image_processor_type"},
                        "size": {"height": 32, "width": 32}})
    pixel = {n: proc(images=Image.fromarray(img), return_tensors="pt").pixel_values for n, img in images.items()}
    # The first model seed whose two images' logit margins (nsfw - normal) are at least 1 apart, so
    # that shifting the nsfw bias puts the threshold between them with room on both sides.
    for k in range(100):
        model = tiny_model(torch.Generator().manual_seed(SEED + k))
        round_bf16(model)
        margins = {n: float((lambda l: l[0, 1] - l[0, 0])(logits_of(model, pv))) for n, pv in pixel.items()}
        if abs(margins["wide"] - margins["small"]) > 1.0:
            break
    else:
        raise SystemExit("no seed separates the two images")
    want = float(np.log(THRESHOLD / (1 - THRESHOLD)))
    mid = (margins["wide"] + margins["small"]) / 2
    with torch.no_grad():
        model.classifier.bias[1] += want - mid
    round_bf16(model)

    expected = {}
    for n, pv in pixel.items():
        lg = logits_of(model, pv)
        expected[f"pixel_values.{n}"] = pv.contiguous()
        expected[f"logits.{n}"] = lg
        expected[f"probs.{n}"] = torch.softmax(lg, -1)
    probs = {n: float(expected[f"probs.{n}"][0, 1]) for n in pixel}
    assert min(probs.values()) < THRESHOLD <= max(probs.values()), probs
    rnd = torch.randn(2, 3, 32, 32, generator=g)
    expected["random_pixels"] = rnd
    expected["logits.random"] = logits_of(model, rnd)

    model_dir = os.path.join(OUT, "model")
    model.to(torch.bfloat16).save_pretrained(model_dir)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump({**FALCONSAI_PROCESSOR, "size": {"height": 32, "width": 32}}, f, indent=2, sort_keys=True)
        f.write("\n")
    # Reload as transformers would and check it reproduces the references (bf16 file, f32 compute).
    again = ViTForImageClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    for n, pv in pixel.items():
        assert torch.equal(logits_of(again, pv), expected[f"logits.{n}"]), n
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "PIL": PIL.__version__}
    save_file({k: v.contiguous().float() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"), meta)
    print(f"model seed {SEED + k}; nsfw probabilities:", probs, "margins before the shift:", margins)
    for f in sorted(os.listdir(OUT)) + ["model/" + x for x in sorted(os.listdir(model_dir))]:
        p = os.path.join(OUT, f)
        if os.path.isfile(p):
            print(f"{os.path.getsize(p):>8}  {p}")

    if args.vit_b16:
        vit_b16(args.vit_b16, g)


def vit_b16(out, g):
    """Falconsai's architecture with HF's random init (trunc-normal 0.02), f32, and a reference."""
    cfg = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(out)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(FALCONSAI_PROCESSOR, f, indent=2, sort_keys=True)
    img = input_images(g)["wide"]
    Image.fromarray(img).save(os.path.join(out, "wide.png"))
    proc = Processor(**{k: v for k, v in FALCONSAI_PROCESSOR.items() if k != "image_processor_type"})
    pv = proc(images=Image.fromarray(img), return_tensors="pt").pixel_values
    times = []
    for _ in range(5):
        t = time.perf_counter()
        lg = logits_of(model, pv)
        times.append(time.perf_counter() - t)
    save_file({"logits.wide": lg.contiguous(), "pixel_values.wide": pv.contiguous()},
              os.path.join(out, "expected.safetensors"))
    print(f"ViT-B/16 written to {out}; transformers forward, {torch.get_num_threads()} threads: "
          f"median {sorted(times)[2] * 1e3:.1f} ms of {[round(t * 1e3, 1) for t in times]}")


if __name__ == "__main__":
    main()
