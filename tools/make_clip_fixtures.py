#!/usr/bin/env python3
"""Golden fixtures of the CLIP-L text encoder and its tokenizer (src/text/clip.rs, tests/clip.rs).

No hub download is possible, so the script builds everything from scratch:

  * a tiny CLIP-style byte-level BPE: vocab.json + merges.txt laid out exactly like openai's
    (256 byte symbols, the same 256 with '</w>', then one entry per merge in merge order, then
    <|startoftext|> and <|endoftext|>, so <|endoftext|> has the LARGEST id as in the real 49408 vocab),
    with the merges learnt by plain BPE on a small built-in corpus pre-tokenised the way CLIP does it;
  * a tiny random `CLIPTextModel` (hidden 12, 3 heads, MLP 20, 2 layers, 16 positions, quick_gelu,
    eos_token_id = <|endoftext|>, so HF pools at the first EOS), every parameter rounded to bf16.

Outputs (all references by HF transformers in float32 on the CPU):

  tests/fixtures/pipeline/tokenizer/     vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                         (FLUX.1-dev's tokenizer/ layout)
  tests/fixtures/pipeline/text_encoder/  config.json + model.safetensors (bf16), as CLIPTextModel.save_pretrained
  tests/fixtures/clip/tokenizer.json     the same tokenizer as HF's CLIPTokenizer serialises it
  tests/fixtures/clip/clip-single.safetensors
                                         single file as ComfyUI has it: text_model.* in f16, plus a random
                                         text_projection.weight and logit_scale that a loader must ignore;
                                         metadata `config` = the CLIPTextConfig JSON (heads cannot be inferred)
  tests/fixtures/clip/expected.safetensors
      ids [2,16] I64            HF tokenizer, max_length 16, padding="max_length", truncation=True
      hidden [2,16,12] F32      last_hidden_state of the bf16 model (after final_layer_norm)
      pooled [2,12] F32         pooler_output (hidden at the first EOS, before text_projection)
      hidden_f16, pooled_f16    the same for the f16 single file (written only where f16 rounding changed a weight)
      tok_ids [N,77] I64        HF ids of metadata["tok_prompts"] (JSON list), max_length 77, same options
      metadata: prompts (JSON list of the two prompts of `ids`), tok_prompts, tok_max_len, eos_id, bos_id, pad_id

Regenerate from the repository root (Python with torch, transformers >= 5, tokenizers, safetensors, regex):

    /work/venvs/ref/bin/python tools/make_clip_fixtures.py
"""

import argparse
import collections
import json
import os
import shutil
import tempfile

import regex
import torch
from safetensors.torch import save_file

SEED = 20250312
N_MERGES = 160
MAX_LEN = 16
TOK_MAX_LEN = 77  # FLUX: padding="max_length", max_length 77

CORPUS = """
a photo of a cat sitting on a red chair in the garden
a photograph of the dog running through the park at sunset
an oil painting of a lighthouse on a rocky coast, dramatic lighting
portrait of a woman with long hair, studio lighting, 85mm, highly detailed
the quick brown fox jumps over the lazy dog
a watercolor illustration of mountains and a lake in the morning
it's a beautiful day; they're walking to the station and we've got tickets
cinematic shot of a city street at night with neon lights and rain
a bowl of fruit on the kitchen table, apples oranges and bananas
there are 3 birds on the wire and 12 clouds in the sky
a close-up photo of a flower with water drops, macro photography
the painting shows a ship sailing on the ocean during a storm
"""

PROMPTS = [
    "A photo of a cat on the chair",
    "Cinematic portrait of the painter's dog running through a garden at sunset, highly detailed 8k",
]

TOK_PROMPTS = PROMPTS + [
    "",
    "   Hello,    WORLD!!  it's   3:45pm\t\tand  we'll see... ",
    "Café naïve résumé — über straße; emoji 🐱🚀 日本語テキスト",
    "a photo of <|endoftext|> a cat <|startoftext|>",
    "quick-brown_fox's 1234567 $$$ ((masterpiece)), [best quality] {x}",
    "the " * 100,
    # Unicode corners where regex engines may disagree (HF's tokenizers uses Oniguruma, the Rust crate fancy-regex):
    # no-break and ideographic spaces, a zero-width space, a combining accent (NFC), fullwidth digits, newlines,
    # upper-case special token text (the added tokens are `normalized`, so they match after lowercasing).
    "no\u00a0break\u3000ideo\u200bzw e\u0301t\u00e9 \uff11\uff12 line\nbreak\r\n<|ENDOFTEXT|> I'M DON'T",
]

CLIP_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def train_bpe(corpus, n_merges):
    """Plain BPE over CLIP-pretokenised words (last symbol carries '</w>'). Ties broken by the pair's text."""
    b2u = bytes_to_unicode()
    text = regex.sub(r"\s+", " ", corpus).strip().lower()
    words = collections.Counter(regex.findall(CLIP_PAT, text))
    seqs = {}
    for w, c in words.items():
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] += "</w>"
        seqs[tuple(syms)] = c
    base = list(b2u.values())
    vocab = set(base) | {s + "</w>" for s in base}
    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for syms, c in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += c
        cands = [(-c, p) for p, c in pairs.items() if p[0] + p[1] not in vocab]
        if not cands:
            break
        _, (a, b) = min(cands)
        merges.append((a, b))
        vocab.add(a + b)
        new = {}
        for syms, c in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        seqs = new
    toks = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(toks)) == len(toks)
    return {t: i for i, t in enumerate(toks)}, merges


def write_tokenizer_folder(d, vocab, merges):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok = lambda c: {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    # As openai/clip-vit-large-patch14 (and FLUX.1-dev tokenizer/) ship them.
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(sot): {**tok("<|startoftext|>"), "special": True},
                                 str(eot): {**tok("<|endoftext|>"), "special": True}},
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        # The text encoder's positions (MAX_LEN), so that diffusers' FluxPipeline, which pads
        # CLIP prompts to model_max_length, can run the tiny folder (FLUX.1-dev's has 77 and 77).
        "model_max_length": MAX_LEN,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    stm = {"bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"), "pad_token": "<|endoftext|>",
           "unk_token": tok("<|endoftext|>")}
    with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
        json.dump(stm, f, indent=2)


def hf_ids(tok, prompts, max_len):
    enc = tok(prompts, max_length=max_len, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"].to(torch.int64)


def randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state.float().contiguous(), out.pooler_output.float().contiguous()


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures", help="fixtures root (default tests/fixtures)")
    args = ap.parse_args()
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(SEED)
    tok_dir = os.path.join(args.out, "pipeline", "tokenizer")
    te_dir = os.path.join(args.out, "pipeline", "text_encoder")
    clip_dir = os.path.join(args.out, "clip")
    for d in (tok_dir, te_dir, clip_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    # ---- tokenizer ----------------------------------------------------------------------------------
    vocab, merges = train_bpe(CORPUS, N_MERGES)
    write_tokenizer_folder(tok_dir, vocab, merges)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    sot, eot = tok.bos_token_id, tok.eos_token_id
    assert (sot, eot, tok.pad_token_id) == (len(vocab) - 2, len(vocab) - 1, len(vocab) - 1), (sot, eot)
    assert len(tok) == len(vocab)
    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td)
        shutil.copy(os.path.join(td, "tokenizer.json"), os.path.join(clip_dir, "tokenizer.json"))
    tok2 = CLIPTokenizer.from_pretrained(clip_dir)  # tokenizer.json alone, as HF reads it
    ids = hf_ids(tok, PROMPTS, MAX_LEN)
    tok_ids = hf_ids(tok, TOK_PROMPTS, TOK_MAX_LEN)
    assert torch.equal(ids, hf_ids(tok2, PROMPTS, MAX_LEN)) and torch.equal(tok_ids, hf_ids(tok2, TOK_PROMPTS, TOK_MAX_LEN))
    # The raw `tokenizers` library on tokenizer.json with the special tokens added by hand must agree too.
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(os.path.join(clip_dir, "tokenizer.json"))
    for p, row in zip(TOK_PROMPTS, tok_ids.tolist()):
        body = raw.encode(p, add_special_tokens=False).ids[: TOK_MAX_LEN - 2]
        want = [sot] + body + [eot]
        assert row == want + [eot] * (TOK_MAX_LEN - len(want)), (p, row, want)
    assert int((ids[1] != eot).sum()) == MAX_LEN - 1, "second prompt must truncate"
    assert any((r != eot).sum() == TOK_MAX_LEN - 1 for r in tok_ids), "a tok prompt must truncate"

    # ---- model --------------------------------------------------------------------------------------
    cfg = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=20, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=MAX_LEN, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=12,
        bos_token_id=sot, eos_token_id=eot, pad_token_id=eot,
    )
    model = CLIPTextModel(cfg).eval().float()
    randomise(model, gen)
    hidden, pooled = run(model, ids)
    # pooled really is the hidden state at the first EOS
    first_eos = (ids == eot).int().argmax(-1)
    assert torch.equal(pooled, hidden[torch.arange(2), first_eos])
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; FLUX.1-dev's text_encoder/ (written by
    # transformers 4) has it, so the folder is written by hand in that layout (and HF must load it back exactly).
    model.config.dtype = "bfloat16"
    model.config.save_pretrained(te_dir)
    sd = {"text_model." + k.removeprefix("text_model."): v.to(torch.bfloat16).contiguous()
          for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(sd, os.path.join(te_dir, "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = CLIPTextModel.from_pretrained(te_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reloaded.eval()
    h2, p2 = run(reloaded, ids)
    assert torch.equal(h2, hidden) and torch.equal(p2, pooled), "bf16 folder does not reload exactly"

    # ---- single file (f16, ComfyUI style) -----------------------------------------------------------
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    sd["text_projection.weight"] = torch.randn(12, 12, generator=gen).to(torch.float16)
    sd["logit_scale"] = torch.tensor(4.6052, dtype=torch.float16)
    # The head count is in no shape (hidden 12 is not a multiple of CLIP's head width 64), so this file carries its
    # config in the metadata, which ClipTextModel::open reads when there is no config.json.
    save_file(sd, os.path.join(clip_dir, "clip-single.safetensors"),
              metadata={"format": "pt", "config": model.config.to_json_string(use_diff=False)})
    m16 = CLIPTextModel(cfg).eval().float()
    missing, unexpected = m16.load_state_dict(
        {k.removeprefix("text_model."): v.float() for k, v in sd.items() if k.startswith("text_model.")}, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected, (missing, unexpected)
    hidden16, pooled16 = run(m16, ids)

    out = {"ids": ids, "hidden": hidden, "pooled": pooled, "tok_ids": tok_ids}
    f16_differs = not torch.equal(hidden16, hidden)
    if f16_differs:
        out["hidden_f16"], out["pooled_f16"] = hidden16, pooled16
    meta = {"prompts": json.dumps(PROMPTS), "tok_prompts": json.dumps(TOK_PROMPTS), "tok_max_len": str(TOK_MAX_LEN),
            "bos_id": str(sot), "eos_id": str(eot), "pad_id": str(eot), "transformers": transformers.__version__,
            "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(clip_dir, "expected.safetensors"), metadata=meta)

    print(f"vocab {len(vocab)} ({len(merges)} merges), bos {sot}, eos {eot}")
    print("ids", ids.tolist())
    print(f"|hidden| rms {hidden.pow(2).mean().sqrt():.3f}, |pooled| rms {pooled.pow(2).mean().sqrt():.3f}")
    print(f"f16 single file differs: {f16_differs} (rel L2 hidden {rel_l2(hidden16, hidden):.2e})")
    for root, _, files in sorted(os.walk(args.out)):
        if "clip" in root or "pipeline" in root:
            for f in sorted(files):
                p = os.path.join(root, f)
                print(f"  {p}: {os.path.getsize(p)} B")


if __name__ == "__main__":
    main()
