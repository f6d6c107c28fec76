//! CLIP-L text model and tokenizer, as FLUX.1 uses them: the pooled vector `y` that feeds
//! `vector_in` is HF `CLIPTextModel`'s `pooler_output`, the final-LayerNorm hidden state at the
//! first EOS position, taken before `text_projection` (docs/flux-model.md §8.2).
//!
//! The model (HF `modeling_clip.py`, CLIPTextTransformer):
//! ```text
//! x = token_embedding[ids] + position_embedding[0..l]
//! per layer:  x += out_proj(causal_attention(q_proj(LN1 x), k_proj(LN1 x), v_proj(LN1 x)))
//!             x += fc2(quick_gelu(fc1(LN2 x)))          quick_gelu(x) = x·σ(1.702x)
//! hidden = final_layer_norm(x);  pooled[b] = hidden[b, first position with id == eos_id]
//! ```
//! Weights stay memory-mapped in their stored dtype (f32, bf16, f16 or F8_E4M3) and are decoded
//! to f32 one layer at a time inside `encode`, so CLIP-L costs about one layer (~28 MB) of f32
//! beside the map, not the 490 MB of an f32 copy.

use crate::io::read_json;
use crate::io::safetensors::SafeTensors;
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::matmul::{gemm, linear_forward};
use crate::ops::norm::layernorm_affine_forward;
use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Shape and constants of a CLIP text model (HF `CLIPTextConfig` names in the field docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// `vocab_size` (49408 for CLIP-L).
    pub vocab: usize,
    /// `hidden_size` (768).
    pub hidden: usize,
    /// `num_attention_heads` (12).
    pub heads: usize,
    /// `intermediate_size` (3072).
    pub mlp: usize,
    /// `num_hidden_layers` (12).
    pub layers: usize,
    /// `max_position_embeddings` (77): the longest sequence `encode` accepts.
    pub max_pos: usize,
    /// `layer_norm_eps` (1e-5).
    pub eps: f32,
    /// The token whose first occurrence is pooled (<|endoftext|>, 49407 for CLIP-L).
    pub eos_id: u32,
}

impl ClipConfig {
    /// CLIP ViT-L/14's text tower, as FLUX.1 loads it.
    pub fn clip_l() -> ClipConfig {
        ClipConfig {
            vocab: 49408,
            hidden: 768,
            heads: 12,
            mlp: 3072,
            layers: 12,
            max_pos: 77,
            eps: 1e-5,
            eos_id: 49407,
        }
    }

    /// Every tensor the model reads, with its shape (names without the `text_model.` prefix).
    fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (c, m) = (self.hidden, self.mlp);
        let mut v = vec![
            ("embeddings.token_embedding.weight".to_string(), vec![self.vocab, c]),
            ("embeddings.position_embedding.weight".to_string(), vec![self.max_pos, c]),
        ];
        for i in 0..self.layers {
            let p = format!("encoder.layers.{i}.");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.push((format!("{p}self_attn.{proj}.weight"), vec![c, c]));
                v.push((format!("{p}self_attn.{proj}.bias"), vec![c]));
            }
            for ln in ["layer_norm1", "layer_norm2"] {
                v.push((format!("{p}{ln}.weight"), vec![c]));
                v.push((format!("{p}{ln}.bias"), vec![c]));
            }
            v.push((format!("{p}mlp.fc1.weight"), vec![m, c]));
            v.push((format!("{p}mlp.fc1.bias"), vec![m]));
            v.push((format!("{p}mlp.fc2.weight"), vec![c, m]));
            v.push((format!("{p}mlp.fc2.bias"), vec![c]));
        }
        v.push(("final_layer_norm.weight".to_string(), vec![c]));
        v.push(("final_layer_norm.bias".to_string(), vec![c]));
        v
    }
}

/// A CLIP text encoder over a memory-mapped checkpoint.
pub struct ClipTextModel {
    pub cfg: ClipConfig,
    st: SafeTensors,
    /// `text_model.` (transformers 4, ComfyUI, FLUX.1-dev's text_encoder/) or empty (a
    /// `CLIPTextModel` saved by transformers ≥ 5, which drops the prefix).
    prefix: &'static str,
}

/// The f32 weights of one encoder layer, decoded from the map for the duration of a forward.
struct LayerWeights {
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    q_w: Vec<f32>,
    q_b: Vec<f32>,
    k_w: Vec<f32>,
    k_b: Vec<f32>,
    v_w: Vec<f32>,
    v_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
    fc1_w: Vec<f32>,
    fc1_b: Vec<f32>,
    fc2_w: Vec<f32>,
    fc2_b: Vec<f32>,
}

/// Keys a CLIP checkpoint may carry that the text encoder does not use: the projection into the
/// joint image-text space (FLUX takes the vector before it), CLIP's contrastive temperature, the
/// position-id buffer older transformers saved, and the vision tower of a full `CLIPModel` file.
fn is_ignored_key(name: &str, prefix: &str) -> bool {
    name == "text_projection.weight"
        || name == "logit_scale"
        || name == format!("{prefix}embeddings.position_ids")
        || name.starts_with("vision_model.")
        || name.starts_with("visual_projection.")
}

impl ClipTextModel {
    /// Opens an HF `CLIPTextModel` folder (`config.json` + `model.safetensors`, as FLUX.1-dev's
    /// `text_encoder/`) or a single `.safetensors` file (ComfyUI's `clip_l.safetensors`).
    ///
    /// Without a `config.json` the config is read from the shapes: vocab and hidden from the token
    /// embedding, max_pos from the position embedding, layers from the highest layer index, mlp
    /// from `fc1`; eps 1e-5; eos_id = vocab − 1 (CLIP's vocab ends with <|endoftext|>). The head
    /// count is not in any shape: a single file may carry HF config fields as JSON in its
    /// safetensors metadata under `config` (`num_attention_heads`, `layer_norm_eps`,
    /// `eos_token_id`, `hidden_act`); otherwise heads = hidden / 64, CLIP's head width (12 for
    /// CLIP-L's 768, 16 for OpenCLIP-H's 1024, 20 for bigG's 1280), and a hidden size that 64 does
    /// not divide is an error asking for a config.
    ///
    /// A config `eos_token_id` of 2 is the pre-2023 placeholder of openai's config.json, for which
    /// HF pools at `argmax(ids)`; since <|endoftext|> is the largest id that is the first EOS, so
    /// eos_id becomes vocab − 1.
    ///
    /// Every tensor is checked before use: missing, wrong shape, non-float and unexpected keys are
    /// errors naming the file and the tensor. Ignored: `text_projection.weight`, `logit_scale`,
    /// `*embeddings.position_ids` and a full CLIPModel's `vision_model.*`/`visual_projection.*`.
    pub fn open(path: &Path) -> Result<ClipTextModel> {
        let (file, config_json) = if path.is_dir() {
            let file = path.join("model.safetensors");
            if !file.is_file() {
                bail!(
                    "{}: no model.safetensors (expected an HF CLIPTextModel folder: config.json + model.safetensors; \
                     sharded text encoders are not supported)",
                    path.display()
                );
            }
            let cfg_path = path.join("config.json");
            let cfg = if cfg_path.is_file() { Some(read_json(&cfg_path)?) } else { None };
            (file, cfg.map(|c| (cfg_path, c)))
        } else {
            (path.to_path_buf(), None)
        };
        let st = SafeTensors::open(&file)?;
        let fname = file.display().to_string();
        let prefix = if st.tensors().keys().any(|k| k.starts_with("text_model.")) { "text_model." } else { "" };

        let config_json = match config_json {
            Some(c) => Some(c),
            None => match st.metadata().get("config") {
                Some(s) => Some((
                    file.clone(),
                    serde_json::from_str(s)
                        .with_context(|| format!("{fname}: metadata `config` is not JSON or not a CLIP config"))?,
                )),
                None => None,
            },
        };
        let cfg = infer_config(&st, prefix, config_json.as_ref().map(|(p, v)| (p.as_path(), v)))
            .with_context(|| format!("{fname}: cannot determine the CLIP text config"))?;

        // Validation: every expected tensor present, right shape, float; nothing unexplained.
        let expected = cfg.expected_tensors();
        for (name, shape) in &expected {
            let key = format!("{prefix}{name}");
            let info = st.info(&key).with_context(|| {
                format!(
                    "{fname}: missing tensor `{key}` (CLIP text model with {} layers, hidden {})",
                    cfg.layers, cfg.hidden
                )
            })?;
            if &info.shape != shape {
                bail!("{fname}: tensor `{key}` has shape {:?}, expected {shape:?} for {cfg:?}", info.shape);
            }
            if !info.dtype.is_float() {
                bail!("{fname}: tensor `{key}` has dtype {}, expected F32, BF16, F16 or F8_E4M3", info.dtype.name());
            }
        }
        let known: BTreeSet<String> = expected.iter().map(|(n, _)| format!("{prefix}{n}")).collect();
        if let Some(k) = st.tensors().keys().find(|k| !known.contains(*k) && !is_ignored_key(k, prefix)) {
            bail!(
                "{fname}: unexpected tensor `{k}` (not part of a {}-layer CLIP text model; expected keys \
                 `text_model.embeddings.*`, `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`)",
                cfg.layers
            );
        }
        Ok(ClipTextModel { cfg, st, prefix })
    }

    fn read(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.st.read_f32(&format!("{}{name}", self.prefix))?.1)
    }

    fn layer_weights(&self, i: usize) -> Result<LayerWeights> {
        let p = format!("encoder.layers.{i}.");
        let r = |n: &str| self.read(&format!("{p}{n}"));
        Ok(LayerWeights {
            ln1_w: r("layer_norm1.weight")?,
            ln1_b: r("layer_norm1.bias")?,
            q_w: r("self_attn.q_proj.weight")?,
            q_b: r("self_attn.q_proj.bias")?,
            k_w: r("self_attn.k_proj.weight")?,
            k_b: r("self_attn.k_proj.bias")?,
            v_w: r("self_attn.v_proj.weight")?,
            v_b: r("self_attn.v_proj.bias")?,
            out_w: r("self_attn.out_proj.weight")?,
            out_b: r("self_attn.out_proj.bias")?,
            ln2_w: r("layer_norm2.weight")?,
            ln2_b: r("layer_norm2.bias")?,
            fc1_w: r("mlp.fc1.weight")?,
            fc1_b: r("mlp.fc1.bias")?,
            fc2_w: r("mlp.fc2.weight")?,
            fc2_b: r("mlp.fc2.bias")?,
        })
    }

    /// ids [b, l] → (last_hidden_state after the final LayerNorm [b, l, hidden], pooled
    /// [b, hidden] = the hidden state at the first position whose id is `eos_id`).
    ///
    /// No padding mask, only the causal one, as FLUX calls CLIP (padding is <|endoftext|> and
    /// sits after the pooled position, so it cannot reach it through a causal mask). A row
    /// without `eos_id` is an error: HF would silently pool position 0.
    pub fn encode(&self, ids: &[u32], b: usize, l: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.cfg;
        let c = cfg.hidden;
        ensure!(ids.len() == b * l, "CLIP encode: {} ids for b={b} × l={l}", ids.len());
        ensure!(l >= 1 && l <= cfg.max_pos, "CLIP encode: sequence length {l} outside 1..={}", cfg.max_pos);
        if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= cfg.vocab) {
            bail!("CLIP encode: id {t} at [{}, {}] is outside the vocabulary of {}", i / l, i % l, cfg.vocab);
        }
        let eos_pos: Vec<usize> = (0..b)
            .map(|bi| {
                ids[bi * l..(bi + 1) * l].iter().position(|&t| t == cfg.eos_id).with_context(|| {
                    format!(
                        "CLIP encode: row {bi} has no EOS token (id {}) to pool at; tokenize with ClipTokenizer",
                        cfg.eos_id
                    )
                })
            })
            .collect::<Result<_>>()?;

        let mut x = vec![0f32; b * l * c];
        embeddings_forward(&mut x, &self.st, self.prefix, ids, b, l, c)?;
        for i in 0..cfg.layers {
            let w = self.layer_weights(i)?;
            encoder_layer_forward(&mut x, &w, b, l, cfg);
        }
        let mut hidden = vec![0f32; b * l * c];
        layernorm_affine_forward(
            &mut hidden,
            &x,
            &self.read("final_layer_norm.weight")?,
            &self.read("final_layer_norm.bias")?,
            b * l,
            c,
            cfg.eps,
        );
        let mut pooled = vec![0f32; b * c];
        for (bi, &t) in eos_pos.iter().enumerate() {
            let row = (bi * l + t) * c;
            pooled[bi * c..(bi + 1) * c].copy_from_slice(&hidden[row..row + c]);
        }
        Ok((hidden, pooled))
    }
}

/// x[b, l, c] = token_embedding[ids] + position_embedding[0..l]; only the rows used are decoded.
fn embeddings_forward(
    x: &mut [f32],
    st: &SafeTensors,
    prefix: &str,
    ids: &[u32],
    b: usize,
    l: usize,
    c: usize,
) -> Result<()> {
    let tok = format!("{prefix}embeddings.token_embedding.weight");
    let mut pos = vec![0f32; l * c];
    st.read_rows_f32(&format!("{prefix}embeddings.position_embedding.weight"), 0..l, &mut pos)?;
    for (i, (row, &t)) in x.chunks_mut(c).zip(ids).enumerate() {
        st.read_rows_f32(&tok, t as usize..t as usize + 1, row)?;
        let p = &pos[(i % l) * c..(i % l + 1) * c];
        row.iter_mut().zip(p).for_each(|(r, &p)| *r += p);
    }
    debug_assert_eq!(x.len(), b * l * c);
    Ok(())
}

/// One pre-LN CLIP encoder layer, in place on the residual stream x [b, l, c].
fn encoder_layer_forward(x: &mut [f32], w: &LayerWeights, b: usize, l: usize, cfg: &ClipConfig) {
    let (c, h, m) = (cfg.hidden, cfg.heads, cfg.mlp);
    let d = c / h;
    let rows = b * l;
    let mut ln = vec![0f32; rows * c];
    let mut y = vec![0f32; rows * c];

    // Attention branch.
    layernorm_affine_forward(&mut ln, x, &w.ln1_w, &w.ln1_b, rows, c, cfg.eps);
    let mut heads = [vec![0f32; rows * c], vec![0f32; rows * c], vec![0f32; rows * c]];
    for (dst, (wt, bs)) in heads.iter_mut().zip([(&w.q_w, &w.q_b), (&w.k_w, &w.k_b), (&w.v_w, &w.v_b)]) {
        linear_forward(&mut y, &ln, wt, Some(bs), rows, c, c);
        split_heads(dst, &y, b, l, c, 0, h, d, l, 0);
    }
    let mut att = vec![0f32; rows * c];
    causal_attention_forward(&mut att, &heads[0], &heads[1], &heads[2], b, h, l, d);
    merge_heads(&mut ln, &att, b, l, c, 0, h, d, l, 0);
    linear_forward(&mut y, &ln, &w.out_w, Some(&w.out_b), rows, c, c);
    x.iter_mut().zip(&y).for_each(|(x, &y)| *x += y);

    // MLP branch.
    layernorm_affine_forward(&mut ln, x, &w.ln2_w, &w.ln2_b, rows, c, cfg.eps);
    let mut mid = vec![0f32; rows * m];
    linear_forward(&mut mid, &ln, &w.fc1_w, Some(&w.fc1_b), rows, c, m);
    quick_gelu_forward(&mut mid);
    linear_forward(&mut y, &mid, &w.fc2_w, Some(&w.fc2_b), rows, m, c);
    x.iter_mut().zip(&y).for_each(|(x, &y)| *x += y);
}

/// In place: x ← x·σ(1.702x), CLIP's `quick_gelu` (OpenAI's original activation).
fn quick_gelu_forward(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v /= 1.0 + (-1.702 * *v).exp());
}

/// out[b, h, l, d] = softmax(q kᵀ / √d + causal mask) v per (b, h): query i sees keys 0..=i.
/// (`ops::attention::attention_forward` has no mask; FLUX's own attention never needs one.)
#[allow(clippy::too_many_arguments)]
fn causal_attention_forward(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], b: usize, h: usize, l: usize, d: usize) {
    let n = l * d;
    assert_eq!(q.len(), b * h * n);
    assert_eq!(out.len(), b * h * n);
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(n).enumerate().for_each(|(bh, o)| {
        let (qh, kh, vh) = (&q[bh * n..(bh + 1) * n], &k[bh * n..(bh + 1) * n], &v[bh * n..(bh + 1) * n]);
        let mut s = vec![0f32; l * l];
        gemm(l, d, l, scale, qh, (d, 1), kh, (1, d), 0.0, &mut s, (l, 1));
        for (i, row) in s.chunks_mut(l).enumerate() {
            // Causal: token i sees tokens 0..=i.
            crate::ops::attention::softmax_in_place(&mut row[..=i]);
            row[i + 1..].fill(0.0);
        }
        gemm(l, l, d, 1.0, &s, (l, 1), vh, (d, 1), 0.0, o, (d, 1));
    });
}

/// The fields of an HF CLIP `config.json` that are read: a CLIPTextConfig's, or a full
/// CLIPModel's whose `text_config` holds them.
#[derive(Deserialize)]
struct HfClipConfig {
    text_config: Option<Box<HfClipConfig>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    max_position_embeddings: Option<usize>,
    num_attention_heads: Option<usize>,
    layer_norm_eps: Option<f64>,
    eos_token_id: Option<u64>,
    hidden_act: Option<String>,
}

/// The config from `config.json` (or the file's metadata) where given, else from the shapes
/// (rules in `ClipTextModel::open`). The result is validated against the tensors by the caller.
fn infer_config(st: &SafeTensors, prefix: &str, json: Option<(&Path, &HfClipConfig)>) -> Result<ClipConfig> {
    let shape = |name: &str| -> Result<Vec<usize>> {
        let key = format!("{prefix}{name}");
        let hint = "an HF CLIP text model has `text_model.embeddings.token_embedding.weight`, \
                    `text_model.encoder.layers.N.*`, …; other prefixes (e.g. a whole SD checkpoint) are not read";
        Ok(st.info(&key).with_context(|| format!("missing tensor `{key}` ({hint})"))?.shape.clone())
    };
    let tok = shape("embeddings.token_embedding.weight")?;
    ensure!(tok.len() == 2, "tensor `{prefix}embeddings.token_embedding.weight` has shape {tok:?}, expected 2-D");
    let pos = shape("embeddings.position_embedding.weight")?;
    ensure!(pos.len() == 2, "tensor `{prefix}embeddings.position_embedding.weight` has shape {pos:?}, expected 2-D");
    let layer_prefix = format!("{prefix}encoder.layers.");
    let layers = crate::util::count_indexed_blocks(
        st.tensors().keys().map(|k| (k.as_str(), k.as_str())),
        &layer_prefix,
        super::MAX_LAYERS,
    )?;
    let fc1 = if layers > 0 { shape("encoder.layers.0.mlp.fc1.weight")? } else { vec![0, 0] };
    ensure!(fc1.len() == 2, "tensor `{prefix}encoder.layers.0.mlp.fc1.weight` has shape {fc1:?}, expected 2-D");
    let mut cfg = ClipConfig {
        vocab: tok[0],
        hidden: tok[1],
        heads: 0,
        mlp: fc1[0],
        layers,
        max_pos: pos[0],
        eps: 1e-5,
        eos_id: tok[0].saturating_sub(1) as u32,
    };
    let Some((src, json)) = json else {
        ensure!(
            cfg.hidden.is_multiple_of(64),
            "hidden size {} is not a multiple of CLIP's head width 64, so the head count cannot be inferred; \
             put the model in a folder with its config.json (num_attention_heads)",
            cfg.hidden
        );
        cfg.heads = cfg.hidden / 64;
        return bounded(cfg, "the shapes");
    };
    // A full CLIPModel config nests the text tower's.
    let j = json.text_config.as_deref().unwrap_or(json);
    let src = src.display();
    let fields: [(Option<usize>, &mut usize); 6] = [
        (j.vocab_size, &mut cfg.vocab),
        (j.hidden_size, &mut cfg.hidden),
        (j.intermediate_size, &mut cfg.mlp),
        (j.num_hidden_layers, &mut cfg.layers),
        (j.max_position_embeddings, &mut cfg.max_pos),
        (j.num_attention_heads, &mut cfg.heads),
    ];
    for (v, field) in fields {
        if let Some(v) = v {
            *field = v;
        }
    }
    if cfg.heads == 0 {
        ensure!(
            cfg.hidden.is_multiple_of(64),
            "{src}: no num_attention_heads and hidden {} is not a multiple of 64",
            cfg.hidden
        );
        cfg.heads = cfg.hidden / 64;
    }
    ensure!(
        cfg.hidden.is_multiple_of(cfg.heads),
        "{src}: hidden_size {} is not divisible by {} heads",
        cfg.hidden,
        cfg.heads
    );
    if let Some(eps) = j.layer_norm_eps {
        cfg.eps = eps as f32;
    }
    cfg.eos_id = match j.eos_token_id {
        Some(2) | None => cfg.vocab.saturating_sub(1) as u32,
        Some(e) => e as u32,
    };
    if let Some(act) = j.hidden_act.as_deref() {
        ensure!(act == "quick_gelu", "{src}: hidden_act `{act}` is not supported (CLIP-L uses quick_gelu)");
    }
    bounded(cfg, &src.to_string())
}

/// Sizes from config.json, metadata or shapes, bounded before the tensor list is built from them.
fn bounded(cfg: ClipConfig, from: &str) -> Result<ClipConfig> {
    for (name, v, max) in [
        ("vocab_size", cfg.vocab, super::MAX_DIM),
        ("hidden_size", cfg.hidden, super::MAX_DIM),
        ("intermediate_size", cfg.mlp, super::MAX_DIM),
        ("num_hidden_layers", cfg.layers, super::MAX_LAYERS),
        ("max_position_embeddings", cfg.max_pos, super::MAX_DIM),
        ("num_attention_heads", cfg.heads, super::MAX_DIM),
    ] {
        ensure!(v <= max, "{from}: CLIP {name} = {v}: at most {max} is supported (CLIP-L: 12 layers, widths ≤ 49,408)");
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// CLIP's pre-tokenisation regex (openai `simple_tokenizer.py`, as HF's CLIP converter writes
/// it into tokenizer.json): contractions, letter runs, single digits, punctuation runs.
const CLIP_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's byte-level BPE tokenizer with BOS/EOS framing and max-length padding, matching HF's
/// `CLIPTokenizer(Fast)` called as FLUX does (`padding="max_length"`, `truncation=True`).
pub struct ClipTokenizer {
    tok: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

/// `bos_token`/`eos_token`/`pad_token`/`unk_token` of a tokenizer_config.json or
/// special_tokens_map.json.
#[derive(Deserialize)]
struct SpecialTokens {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
    unk_token: Option<SpecialToken>,
}

/// A special token: a string, or an AddedToken object `{"content": ..., ...}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn text(&self) -> String {
        match self {
            SpecialToken::Text(s) | SpecialToken::Added { content: s } => s.clone(),
        }
    }
}

impl ClipTokenizer {
    /// Opens `tokenizer.json`, or `vocab.json` + `merges.txt` (FLUX.1-dev's `tokenizer/`), or a
    /// folder holding either (tokenizer.json preferred). From vocab + merges the tokenizer is
    /// built as HF's CLIP converter does: NFC, whitespace runs → one space, lowercase; CLIP's
    /// regex split then ByteLevel; BPE with the `</w>` end-of-word suffix; <|startoftext|> and
    /// <|endoftext|> as special tokens.
    ///
    /// The BOS/EOS/pad/unk tokens come from `tokenizer_config.json`, else
    /// `special_tokens_map.json` beside the files, else (pad only) the tokenizer.json's padding,
    /// else the openai defaults <|startoftext|>, <|endoftext|>, <|endoftext|>, <|endoftext|>.
    /// (Other CLIP tokenizers pad differently: SD 2's pads with `!`, which is why pad is read.)
    pub fn open(path: &Path) -> Result<ClipTokenizer> {
        let (dir, json_file, vocab_merges): (PathBuf, Option<PathBuf>, Option<(PathBuf, PathBuf)>) = if path.is_dir() {
            let tj = path.join("tokenizer.json");
            let (v, m) = (path.join("vocab.json"), path.join("merges.txt"));
            if tj.is_file() {
                (path.to_path_buf(), Some(tj), None)
            } else if v.is_file() && m.is_file() {
                (path.to_path_buf(), None, Some((v, m)))
            } else {
                bail!("{}: neither tokenizer.json nor vocab.json + merges.txt", path.display());
            }
        } else {
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            match path.file_name().and_then(|n| n.to_str()) {
                Some("vocab.json") | Some("merges.txt") => {
                    let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
                    ensure!(v.is_file() && m.is_file(), "{}: vocab.json needs merges.txt beside it", path.display());
                    (dir, None, Some((v, m)))
                }
                _ => (dir, Some(path.to_path_buf()), None),
            }
        };

        // Special tokens: tokenizer_config.json > special_tokens_map.json > defaults.
        let configs: Vec<SpecialTokens> = ["tokenizer_config.json", "special_tokens_map.json"]
            .iter()
            .map(|n| dir.join(n))
            .filter(|p| p.is_file())
            .map(|p| read_json(&p))
            .collect::<Result<_>>()?;
        let lookup = |field: fn(&SpecialTokens) -> &Option<SpecialToken>| {
            configs.iter().find_map(|c| field(c).as_ref().map(SpecialToken::text))
        };

        let mut tok = match (&json_file, &vocab_merges) {
            (Some(f), _) => {
                let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                super::check_tokenizer_json(&bytes, f)?;
                super::guarded(f.display(), || {
                    tokenizers::Tokenizer::from_bytes(&bytes)
                        .map_err(|e| anyhow!("{}: cannot load tokenizer.json: {e}", f.display()))
                })?
            }
            (None, Some((v, m))) => {
                let unk = lookup(|c| &c.unk_token).unwrap_or_else(|| "<|endoftext|>".into());
                build_bpe_tokenizer(v, m, &unk)?
            }
            (None, None) => unreachable!(),
        };
        let file_pad = tok.get_padding().map(|p| p.pad_token.clone());
        // Framing, truncation and padding are done in `encode`, the same way for both sources.
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| anyhow!("{e}"))?;

        let src = json_file.as_ref().or(vocab_merges.as_ref().map(|(v, _)| v)).unwrap().display().to_string();
        let bos_tok = lookup(|c| &c.bos_token).unwrap_or_else(|| "<|startoftext|>".into());
        let eos_tok = lookup(|c| &c.eos_token).unwrap_or_else(|| "<|endoftext|>".into());
        let pad_tok = lookup(|c| &c.pad_token).or(file_pad).unwrap_or_else(|| "<|endoftext|>".into());
        if vocab_merges.is_some() {
            // openai's tokenizer_config marks both as normalized (matched after lowercasing).
            let specials: Vec<tokenizers::AddedToken> = [&bos_tok, &eos_tok]
                .iter()
                .map(|t| tokenizers::AddedToken::from(t.as_str(), true).normalized(true))
                .collect();
            tok.add_special_tokens(&specials);
        }
        let id = |t: &str, what: &str| {
            tok.token_to_id(t).with_context(|| format!("{src}: {what} token `{t}` is not in the vocabulary"))
        };
        Ok(ClipTokenizer { bos: id(&bos_tok, "BOS")?, eos: id(&eos_tok, "EOS")?, pad: id(&pad_tok, "pad")?, tok })
    }

    /// BOS + tokens + EOS, the tokens truncated so that the whole is at most `max_len` (EOS
    /// kept last), then padded to exactly `max_len` with the pad id. FLUX uses max_len 77.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        ensure!(max_len >= 2, "CLIP tokenizer: max_len {max_len} leaves no room for BOS and EOS");
        let text = super::bounded_prompt(text);
        let enc = super::guarded("CLIP tokenizer", || {
            self.tok.encode(text, false).map_err(|e| anyhow!("CLIP tokenizer: cannot encode {text:?}: {e}"))
        })?;
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        ids.extend(enc.get_ids().iter().take(max_len - 2));
        ids.push(self.eos);
        ids.resize(max_len, self.pad);
        Ok(ids)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id the text model pools at (must equal `ClipConfig::eos_id`).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Vocabulary size including the special tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

/// The `tokenizers` pipeline of HF's CLIP converter over openai's vocab.json + merges.txt.
fn build_bpe_tokenizer(vocab_path: &Path, merges_path: &Path, unk: &str) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{replace::Replace, unicode::NFC, utils::Lowercase, utils::Sequence as NormSeq};
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence as PreSeq, split::Split};
    use tokenizers::{NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

    let vocab_text =
        std::fs::read_to_string(vocab_path).with_context(|| format!("cannot read {}", vocab_path.display()))?;
    let vocab: HashMap<String, u32> = serde_json::from_str(&vocab_text)
        .with_context(|| format!("{}: expected a JSON object of token → id", vocab_path.display()))?;
    let merges_text =
        std::fs::read_to_string(merges_path).with_context(|| format!("cannot read {}", merges_path.display()))?;
    let mut merges = Vec::new();
    // The first line is `#version: 0.2`; blank lines (a trailing newline) carry nothing.
    for (n, line) in merges_text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let (a, b) =
            line.split_once(' ').with_context(|| format!("{}:{}: not a merge `a b`", merges_path.display(), n + 1))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .unk_token(unk.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .build()
        .map_err(|e| anyhow!("{}: cannot build the BPE model: {e}", merges_path.display()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let ws = Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
        .map_err(|e| anyhow!("{e}"))?;
    tok.with_normalizer(Some(NormSeq::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(ws),
        NormalizerWrapper::Lowercase(Lowercase),
    ])));
    let split = Split::new(
        tokenizers::pre_tokenizers::split::SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| anyhow!("{e}"))?;
    tok.with_pre_tokenizer(Some(PreSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ])));
    Ok(tok)
}
