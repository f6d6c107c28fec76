#!/usr/bin/env python3
"""Golden fixtures of the T5 v1.1 encoder and its tokenizer (tests/t5.rs).

Writes, from a fixed seed and without any Hub download:

  tests/fixtures/pipeline/tokenizer_2/     spiece.model (+ the tokenizer_config.json / special_tokens_map.json
                                           that HF writes), as FLUX.1-dev's tokenizer_2/ has them
  tests/fixtures/pipeline/text_encoder_2/  config.json, model-0000{1,2}-of-00002.safetensors (bf16),
                                           model.safetensors.index.json: a tiny T5EncoderModel, sharded
  tests/fixtures/t5/t5-single-f16.safetensors         single file, ComfyUI style (shared.weight, encoder.*), f16
  tests/fixtures/t5/t5-single-fp8.safetensors         F8_E4M3 2-D weights, f16 norms, plain cast
  tests/fixtures/t5/t5-single-fp8-scaled.safetensors  F8_E4M3 with per-tensor `<module>.scale_weight` (f32 []) and
                                                      the `scaled_fp8` marker, as ComfyUI's *_scaled files
  tests/fixtures/t5/tokenizer.json         the fast tokenizer HF builds from spiece.model
  tests/fixtures/t5/expected.safetensors   ids and reference outputs (see EXPECTED below)

The tokenizer is a SentencePiece unigram model trained here on a small built-in corpus (pad 0, eos 1, unk 2 as in
T5) with a small custom normalisation rule table, so the spiece.model carries a (small) precompiled charsmap and
the Precompiled normaliser is exercised. HF appends 100 `<extra_id_N>` sentinels to the vocabulary as T5 does.

Run from the repository root:
    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers safetensors tokenizers sentencepiece protobuf
    /tmp/ref/bin/python tools/make_t5_fixtures.py
Used: torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, sentencepiece 0.2.3, protobuf 7.36.2 (CPU, float32).
"""

import json
import math
import os
import shutil
import tempfile

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import T5Config, T5EncoderModel, T5Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TOK_DIR = os.path.join(FIX, "pipeline", "tokenizer_2")
ENC_DIR = os.path.join(FIX, "pipeline", "text_encoder_2")
T5_DIR = os.path.join(FIX, "t5")

MAX_LEN = 16
SPM_VOCAB = 250

CORPUS = """\
A photograph of a red fox sitting in the snow at sunrise.
An oil painting of a lighthouse on a rocky coast during a storm.
A cat wearing a tiny hat, studio lighting, high detail.
A watercolor sketch of a quiet street in Paris after the rain.
Portrait of an old man with a grey beard, soft light, 85mm lens.
A bowl of fresh fruit on a wooden table, morning light.
A futuristic city skyline at night with neon signs and flying cars.
A small wooden boat floating on a calm blue lake surrounded by mountains.
Close-up photo of a honey bee on a yellow flower.
A cozy reading room with a fireplace, books and a sleeping dog.
The astronaut rides a horse across the red desert of Mars.
A bustling market street in the morning, people selling vegetables and bread.
A children's book illustration of a friendly dragon reading a map.
Black and white photo of a train station in the 1950s.
A plate of spaghetti with tomato sauce and basil, food photography.
Macro shot of dew drops on a green leaf.
A knight in shining armor standing before a castle gate.
An abstract painting with bold shapes in orange, teal and purple.
A snowy forest path lit by lanterns at dusk.
A vintage car parked in front of a diner, sunset, film grain.
A sign that says "Hello World" written in chalk on a blackboard.
Two kittens playing with a ball of yarn on a carpet.
A mountain village with white houses and red roofs, aerial view.
A glass of iced coffee on a marble counter, shallow depth of field.
A robot painting a self portrait in a sunny studio.
An ancient temple covered in vines deep in the jungle.
A surfer riding a huge wave, dramatic spray, telephoto shot.
A stack of pancakes with berries and maple syrup.
A cyberpunk alley with rain, reflections and glowing signs.
A field of sunflowers under a bright summer sky.
""".strip().splitlines()

# A small subset of NFKC, as "source code points <TAB> target code points" (hex), which sentencepiece compiles into
# the precompiled charsmap of the model's normalizer_spec.
NORM_RULES = [
    ("FF21", "41"),  # FULLWIDTH LATIN CAPITAL LETTER A -> A
    ("FF41", "61"),  # FULLWIDTH LATIN SMALL LETTER A -> a
    ("FF42", "62"),  # b
    ("FF43", "63"),  # c
    ("FB01", "66 69"),  # LATIN SMALL LIGATURE FI -> fi
    ("2460", "31"),  # CIRCLED DIGIT ONE -> 1
    ("3000", "20"),  # IDEOGRAPHIC SPACE -> space
    ("2019", "27"),  # RIGHT SINGLE QUOTATION MARK -> '
    ("E9", "65 301"),  # é -> e + combining acute
]

# Prompts whose ids are checked exactly against HF (spiece.model and tokenizer.json must agree).
TOKENIZER_PROMPTS = [
    "A photograph of a red fox sitting in the snow at sunrise.",
    "a cat wearing a tiny hat",
    "",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand newlines",
    "UPPER case Words, digits 1234567890 and punctuation!?;:",
    "unknown glyphs: \u6f22\u5b57 \U0001f600 \u00df",
    "fullwidth \uff21\uff41\uff42\uff43 ligature \ufb01 circled \u2460 ideographic\u3000space caf\u00e9 it\u2019s",
    "special tokens </s> inside <pad> and <unk> and <extra_id_7> too",
    "A very long prompt that will certainly be truncated because it has far more than sixteen tokens in it, "
    "describing a cozy reading room with a fireplace, books and a sleeping dog.",
]

PROMPTS = [TOKENIZER_PROMPTS[0], "a cat wearing a tiny hat"]  # encoder batch
LONG_PROMPT = TOKENIZER_PROMPTS[-1]

# Relative positions whose buckets (HF T5Attention._relative_position_bucket) the Rust test checks.
BUCKET_RANGE = 600


def train_spiece(workdir):
    # Relative paths: the trainer stores its input and prefix in the model, which must not depend on the temp dir.
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with open("corpus.txt", "w") as f:
            f.write("\n".join(CORPUS) + "\n")
        with open("rules.tsv", "w") as f:
            for src, dst in NORM_RULES:
                f.write(f"{src}\t{dst}\n")
        spm.SentencePieceTrainer.train(
            input="corpus.txt",
            model_prefix="spiece",
            model_type="unigram",
            vocab_size=SPM_VOCAB,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            normalization_rule_tsv="rules.tsv",
            num_threads=1,
            seed_sentencepiece_size=10000,
            minloglevel=2,
        )
    finally:
        os.chdir(cwd)
    return os.path.join(workdir, "spiece.model")


def hf_ids(tok, text):
    return tok(text, max_length=MAX_LEN, padding="max_length", truncation=True)["input_ids"]


def make_tokenizers(workdir):
    model = train_spiece(workdir)
    if os.path.isdir(TOK_DIR):
        shutil.rmtree(TOK_DIR)
    os.makedirs(TOK_DIR)
    os.makedirs(T5_DIR, exist_ok=True)
    shutil.copy(model, os.path.join(TOK_DIR, "spiece.model"))

    # HF builds the unigram tokenizer from the SentencePiece protobuf when a folder holds spiece.model only (FLUX.1-dev
    # tokenizer_2 layout). (In transformers 5, `T5Tokenizer(vocab_file=...)` ignores the file: use from_pretrained.)
    tok_a = T5Tokenizer.from_pretrained(TOK_DIR, model_max_length=512)
    save_dir = os.path.join(workdir, "hf_tok")
    tok_a.save_pretrained(save_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(save_dir, name)):
            shutil.copy(os.path.join(save_dir, name), os.path.join(TOK_DIR, name))
    shutil.copy(os.path.join(save_dir, "tokenizer.json"), os.path.join(T5_DIR, "tokenizer.json"))

    # Reload from tokenizer.json alone, as HF does for a folder without spiece.model, and with the bare library.
    only_json = os.path.join(workdir, "only_json")
    os.makedirs(only_json)
    shutil.copy(os.path.join(T5_DIR, "tokenizer.json"), only_json)
    tok_b = T5Tokenizer.from_pretrained(only_json)
    raw = Tokenizer.from_file(os.path.join(T5_DIR, "tokenizer.json"))
    assert tok_a.eos_token_id == 1 and tok_a.pad_token_id == 0 and tok_a.unk_token_id == 2
    rows = []
    for p in TOKENIZER_PROMPTS:
        a, b = hf_ids(tok_a, p), hf_ids(tok_b, p)
        assert a == b, f"spiece.model and tokenizer.json disagree on {p!r}: {a} vs {b}"
        assert raw.encode(p).ids[: MAX_LEN - 1] == [t for t in a if t != 0][: MAX_LEN - 1] or p == ""
        rows.append(a)
    vocab = len(tok_a)
    return rows, vocab, tok_a


def bucket_table():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-BUCKET_RANGE, BUCKET_RANGE + 1, dtype=torch.long)  # stored as I32 below
    out = {}
    for nb, md in ((32, 128), (16, 64)):
        out[f"buckets_{nb}_{md}"] = T5Attention._relative_position_bucket(
            rel, bidirectional=True, num_buckets=nb, max_distance=md
        ).to(torch.int32)
    return rel, out


def round_bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def fp8_cast(t):
    return t.to(torch.float8_e4m3fn)


def make_model(vocab):
    cfg = T5Config(
        vocab_size=vocab,
        d_model=24,
        d_kv=8,
        num_heads=3,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["T5EncoderModel"]
    model = T5EncoderModel(cfg).eval()
    g = torch.Generator().manual_seed(5)
    d, dff = cfg.d_model, cfg.d_ff
    sd = {}
    for name, p in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        n = p.shape[-1]
        if name == "shared.weight":
            w = torch.randn(p.shape, generator=g)
        elif "relative_attention_bias" in name:
            w = torch.randn(p.shape, generator=g)  # std 1: the bias visibly reshapes the softmax
        elif "layer_norm" in name:
            w = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith(".wo.weight"):
            w = torch.randn(p.shape, generator=g) / math.sqrt(dff)
        else:
            # q, k, v, o, wi_0, wi_1: fan-in scaling (q too, unlike HF's init, so scores q·k are O(1) without the
            # 1/sqrt(d) T5 leaves out and the softmax is far from uniform).
            w = torch.randn(p.shape, generator=g) / math.sqrt(n)
        sd[name] = round_bf16(w)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
    assert torch.equal(model.encoder.embed_tokens.weight, sd["shared.weight"])
    return cfg, model, sd


def forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state.float()


def forward_with(model, sd, ids):
    m = T5EncoderModel(model.config).eval()
    m.load_state_dict(sd, strict=False)
    m.encoder.embed_tokens.weight = m.shared.weight
    return forward(m, ids)


def write_sharded(cfg, sd):
    if os.path.isdir(ENC_DIR):
        shutil.rmtree(ENC_DIR)
    os.makedirs(ENC_DIR)
    cfg.save_pretrained(ENC_DIR)
    keys = list(sd.keys())
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map, total = {}, 0
    for fname, ks in shards.items():
        save_file({k: sd[k].to(torch.bfloat16).contiguous() for k in ks}, os.path.join(ENC_DIR, fname),
                  metadata={"format": "pt"})
        for k in ks:
            weight_map[k] = fname
            total += sd[k].numel() * 2
    with open(os.path.join(ENC_DIR, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        rows, tok_vocab, tok = make_tokenizers(work)
    vocab = (tok_vocab + 7) // 8 * 8
    cfg, model, sd = make_model(vocab)

    ids = torch.tensor([hf_ids(tok, p) for p in PROMPTS], dtype=torch.long)
    long_ids = torch.tensor([hf_ids(tok, LONG_PROMPT)], dtype=torch.long)
    assert long_ids[0, -1].item() == 1 and (long_ids[0] != 0).all(), "long prompt must be truncated with EOS last"
    hidden = forward(model, ids)

    # Sharded bf16 HF folder; check HF itself loads it back to the same output.
    write_sharded(cfg, sd)
    reloaded = T5EncoderModel.from_pretrained(ENC_DIR, dtype=torch.float32).eval()
    assert torch.equal(forward(reloaded, ids), hidden)

    # Single-file f16, ComfyUI style: HF state-dict names, with the tied `encoder.embed_tokens.weight` as well.
    sd16 = {k: v.to(torch.float16) for k, v in sd.items()}
    single16 = dict(sd16)
    single16["encoder.embed_tokens.weight"] = sd16["shared.weight"].clone()
    save_file(single16, os.path.join(T5_DIR, "t5-single-f16.safetensors"), metadata={"format": "pt"})
    hidden_f16 = forward_with(model, {k: v.float() for k, v in sd16.items()}, ids)

    # Single-file fp8 e4m3fn: every 2-D weight in fp8 (plain cast), the 1-D norms in f16.
    sd8, sd8_f32 = {}, {}
    for k, v in sd.items():
        if v.dim() == 2:
            sd8[k] = fp8_cast(v)
        else:
            sd8[k] = v.to(torch.float16)
        sd8_f32[k] = sd8[k].float()
    save_file(sd8, os.path.join(T5_DIR, "t5-single-fp8.safetensors"))
    hidden_fp8 = forward_with(model, sd8_f32, ids)

    # Scaled fp8 (ComfyUI `*_fp8_e4m3fn_scaled`): w ≈ fp8(w / s) · s with a per-tensor f32 scale `<module>.scale_weight`
    # for the linear layers and the embedding (`shared.scale_weight`), and an empty `scaled_fp8` marker. The relative
    # bias table stays plain fp8.
    sd8s, sd8s_f32 = {}, {}
    for k, v in sd.items():
        if v.dim() == 2 and "relative_attention_bias" not in k:
            s = (v.abs().max() / 448.0).float().reshape(())
            q = fp8_cast(v / s)
            sd8s[k] = q
            sd8s[k[: -len(".weight")] + ".scale_weight"] = s.clone()
            sd8s_f32[k] = q.float() * s
        elif v.dim() == 2:
            sd8s[k] = fp8_cast(v)
            sd8s_f32[k] = sd8s[k].float()
        else:
            sd8s[k] = v.to(torch.float16)
            sd8s_f32[k] = sd8s[k].float()
    sd8s["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd8s, os.path.join(T5_DIR, "t5-single-fp8-scaled.safetensors"))
    hidden_fp8_scaled = forward_with(model, sd8s_f32, ids)

    rel, buckets = bucket_table()
    expected = {
        "ids": ids,
        "ids_long": long_ids,
        "tok_ids": torch.tensor(rows, dtype=torch.long),
        "hidden": hidden.contiguous(),
        "hidden_f16": hidden_f16.contiguous(),
        "hidden_fp8": hidden_fp8.contiguous(),
        "hidden_fp8_scaled": hidden_fp8_scaled.contiguous(),
        "bucket_rel": rel.to(torch.int32),
        **buckets,
    }
    # One metadata key holding a sorted JSON object: safetensors writes metadata in hash order, so several keys
    # would make the file differ byte-wise from run to run.
    info = {
        "prompts": PROMPTS,
        "long_prompt": LONG_PROMPT,
        "tok_prompts": TOKENIZER_PROMPTS,
        "max_len": MAX_LEN,
        "vocab": vocab,
        "tokenizer_vocab": tok_vocab,
    }
    meta = {"t5_fixture": json.dumps(info, sort_keys=True)}
    save_file(expected, os.path.join(T5_DIR, "expected.safetensors"), metadata=meta)
    back = load_file(os.path.join(T5_DIR, "expected.safetensors"))
    assert torch.equal(back["hidden"], hidden)

    print(f"tokenizer vocab {tok_vocab} (spm {SPM_VOCAB} requested + 100 sentinels), model vocab {vocab}")
    print("ids:", ids.tolist())
    print("long:", long_ids.tolist())
    print("hidden std", hidden.std().item(), "f16 diff", (hidden_f16 - hidden).norm().item() / hidden.norm().item(),
          "fp8 diff", (hidden_fp8 - hidden).norm().item() / hidden.norm().item(),
          "fp8 scaled diff", (hidden_fp8_scaled - hidden).norm().item() / hidden.norm().item())
    for d in (TOK_DIR, ENC_DIR, T5_DIR):
        for f in sorted(os.listdir(d)):
            print(f"{os.path.relpath(os.path.join(d, f), ROOT)}: {os.path.getsize(os.path.join(d, f))} bytes")


if __name__ == "__main__":
    main()
