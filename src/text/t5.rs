//! T5-XXL v1.1 encoder (FLUX's per-token text states `txt`) and its SentencePiece unigram tokenizer.
//! CPU reference in f32, following docs/flux-model.md §8.1 and HF `modeling_t5.py`:
//!
//! ```text
//! x = shared[ids]                                            # no scaling of the embedding
//! bias[h, i, j] = relative_attention_bias[bucket(j − i), h]  # block 0's table, shared by all blocks
//! for each block:
//!     x += o(attention(q(n), k(n), v(n)) + bias)   n = rmsnorm(x)   # scores q·kᵀ, NO 1/√d
//!     x += wo(gelu_tanh(wi_0 n) ⊙ wi_1 n)          n = rmsnorm(x)
//! out = rmsnorm(x, final_layer_norm)                         # last_hidden_state
//! ```
//!
//! As FLUX calls it (BFL `HFEmbedder`): no attention mask, prompts padded with id 0 to max length, so the padding
//! tokens are attended to like any other. Weights stay memory-mapped in their stored dtype; each block is
//! converted to f32 when the forward reaches it, so encoding with T5-XXL (4.76 B parameters) needs the page cache
//! for the file plus one block in f32 (≈ 0.6 GB), not 19 GB.

use crate::io::read_json;
use crate::io::safetensors::{convert_to_f32, SafeTensors, ShardIndex};
use crate::ops::activation::gelu_tanh;
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::matmul::{gemm, linear_forward};
use crate::ops::norm::rmsnorm_forward;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Hyperparameters of a T5 v1.1 encoder (names as HF's `T5Config`, `vocab` = `vocab_size`).
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    pub vocab: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub num_heads: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// `relative_attention_num_buckets` (32).
    pub num_buckets: usize,
    /// `relative_attention_max_distance` (128).
    pub max_distance: usize,
    /// `layer_norm_epsilon` (1e-6).
    pub eps: f32,
}

/// The fields of an HF T5 `config.json` that are read.
#[derive(Deserialize)]
struct HfT5Config {
    vocab_size: Option<usize>,
    d_model: Option<usize>,
    d_kv: Option<usize>,
    num_heads: Option<usize>,
    d_ff: Option<usize>,
    num_layers: Option<usize>,
    relative_attention_num_buckets: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    feed_forward_proj: Option<String>,
    layer_norm_epsilon: Option<f64>,
}

/// The longest T5 sequence: FLUX.1-dev was trained on 512 tokens (schnell on 256), the length of
/// T5's tokenizer (`model_max_length`). Longer sequences are outside what the transformer learnt,
/// and the encoder's attention grows with the square of the length (64 heads × L² scores).
pub const MAX_LEN: usize = 512;

/// `t5_max_len` (`--t5-max-len`, a training config's `t5_max_len`): 1..=[`MAX_LEN`], checked
/// before anything is sized by it.
pub fn check_max_len(len: usize) -> Result<()> {
    ensure!(
        (1..=MAX_LEN).contains(&len),
        "t5_max_len (--t5-max-len) = {len}: must be between 1 and {MAX_LEN} (FLUX.1-dev: 512, schnell: 256)"
    );
    Ok(())
}

impl T5Config {
    /// google/t5-v1_1-xxl, as FLUX.1 uses it (docs/flux-model.md §8.1).
    pub fn xxl() -> T5Config {
        T5Config {
            vocab: 32128,
            d_model: 4096,
            d_kv: 64,
            num_heads: 64,
            d_ff: 10240,
            num_layers: 24,
            num_buckets: 32,
            max_distance: 128,
            eps: 1e-6,
        }
    }

    /// Width of the attention projections, num_heads · d_kv (4096 for XXL).
    pub fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// Reads an HF `config.json`. Only the gated-GELU feed-forward of T5 v1.1 is supported.
    fn from_hf_json(path: &Path) -> Result<T5Config> {
        let v: HfT5Config = read_json(path)?;
        let need = |x: Option<usize>, k: &str| -> Result<usize> {
            x.with_context(|| format!("{}: missing `{k}` (not a T5 config?)", path.display()))
        };
        let ffp = v.feed_forward_proj.as_deref().unwrap_or("relu");
        if ffp != "gated-gelu" && ffp != "gated-gelu_new" {
            bail!(
                "{}: feed_forward_proj is `{ffp}`; only T5 v1.1's `gated-gelu` is supported (FLUX uses \
                 google/t5-v1_1-xxl)",
                path.display()
            );
        }
        let cfg = T5Config {
            vocab: need(v.vocab_size, "vocab_size")?,
            d_model: need(v.d_model, "d_model")?,
            d_kv: need(v.d_kv, "d_kv")?,
            num_heads: need(v.num_heads, "num_heads")?,
            d_ff: need(v.d_ff, "d_ff")?,
            num_layers: need(v.num_layers, "num_layers")?,
            num_buckets: v.relative_attention_num_buckets.unwrap_or(32),
            max_distance: v.relative_attention_max_distance.unwrap_or(128),
            eps: v.layer_norm_epsilon.unwrap_or(1e-6) as f32,
        };
        cfg.check().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            self.vocab > 0 && self.d_model > 0 && self.d_kv > 0 && self.num_heads > 0 && self.d_ff > 0,
            "T5 config has a zero dimension: {self:?}"
        );
        // Sizes come from config.json or shapes: bounded before the tensor list is built from them.
        for (name, v, max) in [
            ("vocab_size", self.vocab, super::MAX_DIM),
            ("d_model", self.d_model, super::MAX_DIM),
            ("d_kv", self.d_kv, super::MAX_DIM),
            ("num_heads", self.num_heads, super::MAX_DIM),
            ("d_ff", self.d_ff, super::MAX_DIM),
            ("num_layers", self.num_layers, super::MAX_LAYERS),
            ("relative_attention_num_buckets", self.num_buckets, super::MAX_DIM),
            ("relative_attention_max_distance", self.max_distance, super::MAX_DIM),
        ] {
            ensure!(v <= max, "T5 {name} = {v}: at most {max} is supported (T5-XXL: 24 layers, widths ≤ 32,128)");
        }
        ensure!(
            self.num_heads.checked_mul(self.d_kv).is_some_and(|w| w <= super::MAX_DIM),
            "T5 num_heads × d_kv overflows"
        );
        ensure!(
            self.num_buckets >= 4 && self.num_buckets.is_multiple_of(2),
            "relative_attention_num_buckets must be even ≥ 4"
        );
        ensure!(self.max_distance > self.num_buckets / 4, "relative_attention_max_distance too small");
        Ok(())
    }

    /// Every tensor of the encoder with its shape, HF names (block 0 alone holds the bias table).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, inner, ff) = (self.d_model, self.inner(), self.d_ff);
        let mut v = vec![("shared.weight".to_string(), vec![self.vocab, d])];
        for i in 0..self.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for w in ["q", "k", "v"] {
                v.push((format!("{p}.0.SelfAttention.{w}.weight"), vec![inner, d]));
            }
            v.push((format!("{p}.0.SelfAttention.o.weight"), vec![d, inner]));
            if i == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![self.num_buckets, self.num_heads],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![d]));
            v.push((format!("{p}.1.DenseReluDense.wi_0.weight"), vec![ff, d]));
            v.push((format!("{p}.1.DenseReluDense.wi_1.weight"), vec![ff, d]));
            v.push((format!("{p}.1.DenseReluDense.wo.weight"), vec![d, ff]));
            v.push((format!("{p}.1.layer_norm.weight"), vec![d]));
        }
        v.push(("encoder.final_layer_norm.weight".to_string(), vec![d]));
        v
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Ops of the forward pass (llm.c style: plain functions over slices, shapes explicit).
// ---------------------------------------------------------------------------------------------------------------

/// Bucket of a relative position `rel` = key position − query position, bidirectional, exactly as HF
/// `T5Attention._relative_position_bucket`: half the buckets for rel > 0; within a half, |rel| < nb/4 exact, then
/// logarithmic up to `max_distance`, clamped to the last bucket. The log is taken in f32 as torch does, so
/// boundaries (e.g. |rel| = 16 → 0.25·8 = 2.0 in exact arithmetic) round the same way.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = ((n as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32) as usize;
        bucket += (max_exact + large).min(half - 1);
    }
    bucket
}

/// bias[h, i, j] = table[bucket(j − i), h] for query i and key j in 0..l; table [num_buckets, heads].
pub fn position_bias_forward(
    bias: &mut [f32],
    table: &[f32],
    l: usize,
    heads: usize,
    num_buckets: usize,
    max_distance: usize,
) {
    assert_eq!(bias.len(), heads * l * l, "position bias: out");
    assert_eq!(table.len(), num_buckets * heads, "position bias: table");
    // One bucket per distance, then a gather per head.
    let buckets: Vec<usize> = (0..2 * l.max(1) - 1)
        .map(|k| relative_position_bucket(k as i64 - (l as i64 - 1), num_buckets, max_distance))
        .collect();
    for h in 0..heads {
        for i in 0..l {
            let row = &mut bias[(h * l + i) * l..(h * l + i + 1) * l];
            for (j, o) in row.iter_mut().enumerate() {
                *o = table[buckets[j + l - 1 - i] * heads + h];
            }
        }
    }
}

/// T5LayerNorm: out = inp · rsqrt(mean(inp²) + eps) ⊙ weight per row of width d (no mean, no bias).
pub fn t5_layernorm_forward(out: &mut [f32], inp: &[f32], weight: &[f32], rows: usize, d: usize, eps: f32) {
    out.copy_from_slice(inp);
    let mut rstd = vec![0f32; rows];
    rmsnorm_forward(out, &mut rstd, weight, rows, d, eps);
}

/// out[b, h, l, d] = softmax(q kᵀ + bias[h]) v per (b, h): T5 attention, unscaled scores (the 1/√d is folded
/// into the trained q weights), no mask.
pub fn t5_attention_forward(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    b: usize,
    h: usize,
    l: usize,
    d: usize,
) {
    let n = l * d;
    assert_eq!(q.len(), b * h * n);
    assert_eq!(k.len(), b * h * n);
    assert_eq!(v.len(), b * h * n);
    assert_eq!(out.len(), b * h * n);
    assert_eq!(bias.len(), h * l * l);
    out.par_chunks_mut(n.max(1)).enumerate().for_each(|(bh, o)| {
        let (qh, kh, vh) = (&q[bh * n..(bh + 1) * n], &k[bh * n..(bh + 1) * n], &v[bh * n..(bh + 1) * n]);
        let hi = bh % h;
        let mut s = bias[hi * l * l..(hi + 1) * l * l].to_vec();
        gemm(l, d, l, 1.0, qh, (d, 1), kh, (1, d), 1.0, &mut s, (l, 1));
        for row in s.chunks_mut(l) {
            crate::ops::attention::softmax_in_place(row);
        }
        gemm(l, l, d, 1.0, &s, (l, 1), vh, (d, 1), 0.0, o, (d, 1));
    });
}

/// Gated GELU of T5 v1.1: out = gelu_tanh(gate) ⊙ up (HF `gelu_new`).
pub fn gated_gelu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert_eq!(out.len(), gate.len());
    assert_eq!(out.len(), up.len());
    out.par_iter_mut().zip(gate.par_iter().zip(up)).for_each(|(o, (&g, &u))| *o = gelu_tanh(g) * u);
}

/// One block's weights in f32.
struct T5Block {
    ln_attn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    ln_ff: Vec<f32>,
    wi_0: Vec<f32>,
    wi_1: Vec<f32>,
    wo: Vec<f32>,
}

/// x [b, l, d_model] ← block(x) in place, with the shared position bias [h, l, l].
fn t5_block_forward(x: &mut [f32], w: &T5Block, bias: &[f32], cfg: &T5Config, b: usize, l: usize) {
    let (d, h, dk, inner, ff) = (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.inner(), cfg.d_ff);
    let n = b * l;
    let mut normed = vec![0f32; n * d];

    // Self-attention sublayer.
    t5_layernorm_forward(&mut normed, x, &w.ln_attn, n, d, cfg.eps);
    let mut proj = vec![0f32; n * inner];
    let mut heads = [vec![0f32; n * inner], vec![0f32; n * inner], vec![0f32; n * inner]];
    for (dst, wt) in heads.iter_mut().zip([&w.q, &w.k, &w.v]) {
        linear_forward(&mut proj, &normed, wt, None, n, d, inner);
        split_heads(dst, &proj, b, l, inner, 0, h, dk, l, 0);
    }
    let mut att = vec![0f32; n * inner];
    t5_attention_forward(&mut att, &heads[0], &heads[1], &heads[2], bias, b, h, l, dk);
    merge_heads(&mut proj, &att, b, l, inner, 0, h, dk, l, 0);
    let mut branch = vec![0f32; n * d];
    linear_forward(&mut branch, &proj, &w.o, None, n, inner, d);
    x.iter_mut().zip(&branch).for_each(|(a, &r)| *a += r);

    // Gated-GELU feed-forward sublayer.
    t5_layernorm_forward(&mut normed, x, &w.ln_ff, n, d, cfg.eps);
    let mut gate = vec![0f32; n * ff];
    let mut up = vec![0f32; n * ff];
    linear_forward(&mut gate, &normed, &w.wi_0, None, n, d, ff);
    linear_forward(&mut up, &normed, &w.wi_1, None, n, d, ff);
    let mut hidden = vec![0f32; n * ff];
    gated_gelu_forward(&mut hidden, &gate, &up);
    linear_forward(&mut branch, &hidden, &w.wo, None, n, ff, d);
    x.iter_mut().zip(&branch).for_each(|(a, &r)| *a += r);
}

// ---------------------------------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------------------------------

/// Where one weight lives: a mapped file, the stored key, and the FP8 dequantisation scale if the file has one
/// (one value, or one per output row).
#[derive(Clone)]
struct WeightRef {
    file: SafeTensors,
    key: String,
    scale: Option<Vec<f32>>,
}

/// A T5 v1.1 encoder over memory-mapped weights (f32, f16, bf16 or F8_E4M3 storage).
pub struct T5Encoder {
    pub cfg: T5Config,
    /// HF name → stored tensor.
    weights: BTreeMap<String, WeightRef>,
    source: PathBuf,
}

/// Keys that may sit in a T5 file besides the encoder's weights and are ignored: the decoder and LM head of a
/// full T5ForConditionalGeneration checkpoint (HF's T5EncoderModel skips them too), ComfyUI's `scaled_fp8`
/// marker and the FP8 input scales (only used by FP8 matmuls).
fn ignored_key(k: &str) -> bool {
    k.starts_with("decoder.") || k == "lm_head.weight" || k == "scaled_fp8" || k.ends_with(".scale_input")
}

/// The safetensors files of a model path and the config.json beside them, if any.
fn resolve_files(path: &Path) -> Result<(Vec<SafeTensors>, Option<PathBuf>)> {
    let dir_of = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let (dir, index) = if path.is_dir() {
        let idx = path.join("model.safetensors.index.json");
        (path.to_path_buf(), idx.is_file().then_some(idx))
    } else if path.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if name.ends_with(".index.json") {
            (dir_of(path), Some(path.to_path_buf()))
        } else if name == "config.json" {
            return resolve_files(&dir_of(path));
        } else {
            // A single file: ComfyUI style, config inferred from the shapes.
            return Ok((vec![SafeTensors::open(path)?], None));
        }
    } else {
        bail!("{}: no such file or folder (expected a T5 encoder folder or .safetensors file)", path.display());
    };
    let config = Some(dir.join("config.json")).filter(|c| c.is_file());
    if let Some(index) = index {
        let map = ShardIndex::read(&index)?.weight_map;
        let mut shards: BTreeMap<String, SafeTensors> = BTreeMap::new();
        for (key, shard) in &map {
            if !shards.contains_key(shard) {
                let st = SafeTensors::open(&dir.join(shard))
                    .with_context(|| format!("shard `{shard}` listed in {}", index.display()))?;
                shards.insert(shard.to_string(), st);
            }
            if shards[shard].info(key).is_none() {
                bail!("{}: says tensor `{key}` is in `{shard}`, but that shard has no such tensor", index.display());
            }
        }
        ensure!(!shards.is_empty(), "{}: empty weight_map", index.display());
        return Ok((shards.into_values().collect(), config));
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok((vec![SafeTensors::open(&single)?], config));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok((vec![SafeTensors::open(&found[0])?], config)),
        0 => bail!("{}: no model.safetensors, model.safetensors.index.json or other .safetensors file", dir.display()),
        _ => bail!(
            "{}: several .safetensors files but no model.safetensors.index.json; pass the file to use",
            dir.display()
        ),
    }
}

/// Config of a single-file checkpoint, read off the tensor shapes. max_distance (128) and eps (1e-6) are not
/// stored anywhere and take T5 v1.1's values.
fn infer_config(all: &BTreeMap<String, SafeTensors>, source: &Path) -> Result<T5Config> {
    let shape = |k: &str| -> Result<Vec<usize>> {
        let f = all.get(k).with_context(|| {
            format!("{}: missing tensor `{k}` (needed to infer the T5 config from shapes)", source.display())
        })?;
        Ok(f.info(k).unwrap().shape.clone())
    };
    let dims2 = |k: &str| -> Result<(usize, usize)> {
        let s = shape(k)?;
        ensure!(s.len() == 2, "{}: tensor `{k}` has shape {s:?}, expected 2-D", all[k].path().display());
        Ok((s[0], s[1]))
    };
    if all.contains_key("encoder.block.0.layer.1.DenseReluDense.wi.weight") {
        bail!(
            "{}: has `encoder.block.0.layer.1.DenseReluDense.wi.weight`, a T5 v1.0 ReLU feed-forward; only T5 v1.1 \
             (gated-GELU, `wi_0`/`wi_1`) is supported",
            source.display()
        );
    }
    let emb = if all.contains_key("shared.weight") { "shared.weight" } else { "encoder.embed_tokens.weight" };
    let (vocab, d_model) = dims2(emb)?;
    let num_layers = crate::util::count_indexed_blocks(
        all.keys().map(|k| (k.as_str(), k.as_str())),
        "encoder.block.",
        super::MAX_LAYERS,
    )
    .with_context(|| format!("{}", source.display()))?;
    ensure!(num_layers > 0, "{}: no `encoder.block.*` tensors: not a T5 encoder", source.display());
    let (num_buckets, num_heads) = dims2("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
    let (inner, _) = dims2("encoder.block.0.layer.0.SelfAttention.q.weight")?;
    let (d_ff, _) = dims2("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?;
    ensure!(
        num_heads > 0 && inner.is_multiple_of(num_heads),
        "{}: q projection width {inner} is not a multiple of the {num_heads} heads of relative_attention_bias",
        source.display()
    );
    let cfg = T5Config {
        vocab,
        d_model,
        d_kv: inner / num_heads,
        num_heads,
        d_ff,
        num_layers,
        num_buckets,
        max_distance: 128,
        eps: 1e-6,
    };
    cfg.check().with_context(|| format!("{}: inferred config", source.display()))?;
    Ok(cfg)
}

/// The FP8 scale of weight `key` (`<module>.weight`): ComfyUI's `<module>.scale_weight`, or `<key>.scale_weight`.
fn find_scale(all: &BTreeMap<String, SafeTensors>, key: &str, rows: usize) -> Result<Option<(String, Vec<f32>)>> {
    let module = key.strip_suffix(".weight").unwrap_or(key);
    for cand in [format!("{module}.scale_weight"), format!("{key}.scale_weight")] {
        if let Some(f) = all.get(&cand) {
            let (_, s) = f.read_f32(&cand)?;
            ensure!(
                s.len() == 1 || s.len() == rows,
                "{}: scale tensor `{cand}` has {} values; expected 1 (per tensor) or {rows} (per row of `{key}`)",
                f.path().display(),
                s.len()
            );
            ensure!(s.iter().all(|x| x.is_finite()), "{}: scale tensor `{cand}` is not finite", f.path().display());
            return Ok(Some((cand, s)));
        }
    }
    Ok(None)
}

impl T5Encoder {
    /// Opens an HF T5EncoderModel folder (config.json + model.safetensors, or shards with
    /// model.safetensors.index.json), or a single safetensors file as ComfyUI users have it
    /// (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn[_scaled].safetensors; config inferred from shapes).
    /// Storage f32/f16/bf16/F8_E4M3; `<module>.scale_weight` tensors, if present, multiply their FP8 weight.
    /// Every tensor is checked (missing, unexpected, wrong shape, non-float dtype) before anything is computed.
    pub fn open(path: &Path) -> Result<T5Encoder> {
        let (files, config) = resolve_files(path)?;
        let mut all: BTreeMap<String, SafeTensors> = BTreeMap::new();
        for f in &files {
            for k in f.tensors().keys() {
                if let Some(prev) = all.insert(k.clone(), f.clone()) {
                    bail!(
                        "tensor `{k}` is in both {} and {}: which one is meant?",
                        prev.path().display(),
                        f.path().display()
                    );
                }
            }
        }
        let cfg = match &config {
            Some(c) => T5Config::from_hf_json(c)?,
            None => infer_config(&all, path)?,
        };

        let mut weights = BTreeMap::new();
        let mut used: BTreeSet<String> = BTreeSet::new();
        for (name, want) in cfg.tensor_shapes() {
            // The embedding is tied: HF stores `shared.weight`, some exports only `encoder.embed_tokens.weight`.
            let key = if name == "shared.weight" && !all.contains_key(&name) {
                "encoder.embed_tokens.weight".to_string()
            } else {
                name.clone()
            };
            let file = all.get(&key).with_context(|| {
                let where_ = files.iter().map(|f| f.path().display().to_string()).collect::<Vec<_>>().join(", ");
                format!("{where_}: missing tensor `{name}` (T5 encoder with {} layers)", cfg.num_layers)
            })?;
            let info = file.info(&key).unwrap();
            ensure!(
                info.shape == want,
                "{}: tensor `{key}` has shape {:?}, expected {want:?} (d_model {}, heads {}×{}, d_ff {}, vocab {})",
                file.path().display(),
                info.shape,
                cfg.d_model,
                cfg.num_heads,
                cfg.d_kv,
                cfg.d_ff,
                cfg.vocab
            );
            ensure!(
                info.dtype.is_float(),
                "{}: tensor `{key}` is stored as {}; expected F32, F16, BF16 or F8_E4M3",
                file.path().display(),
                info.dtype.name()
            );
            let scale = find_scale(&all, &key, want[0])?.map(|(k, s)| {
                used.insert(k);
                s
            });
            used.insert(key.clone());
            weights.insert(name, WeightRef { file: file.clone(), key, scale });
        }
        // The tied copy may sit beside `shared.weight`; it must at least have the same shape.
        if let (Some(f), true) = (all.get("encoder.embed_tokens.weight"), used.contains("shared.weight")) {
            let s = &f.info("encoder.embed_tokens.weight").unwrap().shape;
            ensure!(
                *s == [cfg.vocab, cfg.d_model],
                "{}: tensor `encoder.embed_tokens.weight` has shape {s:?}, expected {:?} like `shared.weight`",
                f.path().display(),
                [cfg.vocab, cfg.d_model]
            );
            used.insert("encoder.embed_tokens.weight".into());
        }
        for (k, f) in &all {
            if !used.contains(k) && !ignored_key(k) {
                bail!(
                    "{}: unexpected tensor `{k}` (not part of a T5 v1.1 encoder with {} layers)",
                    f.path().display(),
                    cfg.num_layers
                );
            }
        }
        Ok(T5Encoder { cfg, weights, source: path.to_path_buf() })
    }

    /// The path it was opened from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// One weight in f32 (dequantised with its scale), converted in parallel chunks.
    fn weight(&self, name: &str) -> Result<Vec<f32>> {
        let w = self.weights.get(name).with_context(|| format!("no weight `{name}`"))?;
        let info = w.file.info(&w.key).unwrap();
        let bytes = w.file.bytes(&w.key)?;
        let sz = info.dtype.size();
        let mut out = vec![0f32; info.numel()];
        const CHUNK: usize = 1 << 16;
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * sz))
            .try_for_each(|(o, b)| convert_to_f32(info.dtype, b, o))
            .with_context(|| format!("{}: tensor `{}`", w.file.path().display(), w.key))?;
        if let Some(s) = &w.scale {
            let cols = out.len() / s.len();
            out.par_chunks_mut(cols.max(1))
                .zip(s.par_iter())
                .for_each(|(row, &s)| row.iter_mut().for_each(|x| *x *= s));
        }
        Ok(out)
    }

    /// Embedding rows of `ids` [n] → [n, d_model], read straight from the mapped table.
    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let d = self.cfg.d_model;
        let w = &self.weights["shared.weight"];
        let mut x = vec![0f32; ids.len() * d];
        for (row, &id) in x.chunks_mut(d).zip(ids) {
            let id = id as usize;
            w.file
                .read_rows_f32(&w.key, id..id + 1, row)
                .with_context(|| format!("{}: tensor `{}`", w.file.path().display(), w.key))?;
            if let Some(s) = &w.scale {
                let s = if s.len() == 1 { s[0] } else { s[id] };
                row.iter_mut().for_each(|x| *x *= s);
            }
        }
        Ok(x)
    }

    fn block(&self, i: usize) -> Result<T5Block> {
        let p = format!("encoder.block.{i}.layer");
        Ok(T5Block {
            ln_attn: self.weight(&format!("{p}.0.layer_norm.weight"))?,
            q: self.weight(&format!("{p}.0.SelfAttention.q.weight"))?,
            k: self.weight(&format!("{p}.0.SelfAttention.k.weight"))?,
            v: self.weight(&format!("{p}.0.SelfAttention.v.weight"))?,
            o: self.weight(&format!("{p}.0.SelfAttention.o.weight"))?,
            ln_ff: self.weight(&format!("{p}.1.layer_norm.weight"))?,
            wi_0: self.weight(&format!("{p}.1.DenseReluDense.wi_0.weight"))?,
            wi_1: self.weight(&format!("{p}.1.DenseReluDense.wi_1.weight"))?,
            wo: self.weight(&format!("{p}.1.DenseReluDense.wo.weight"))?,
        })
    }

    /// ids [b·l] → last_hidden_state [b, l, d_model] (after final_layer_norm), f32. No attention mask, as FLUX.
    pub fn encode(&self, ids: &[u32], b: usize, l: usize) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        ensure!(ids.len() == b * l, "T5 encode: {} ids for batch {b} × length {l}", ids.len());
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab) {
            bail!(
                "T5 encode: token id {id} at position {i} is outside the vocabulary of {} ({})",
                cfg.vocab,
                self.source.display()
            );
        }
        let (d, n) = (cfg.d_model, b * l);
        let mut x = self.embed(ids)?;
        let table = self.weight("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let mut bias = vec![0f32; cfg.num_heads * l * l];
        position_bias_forward(&mut bias, &table, l, cfg.num_heads, cfg.num_buckets, cfg.max_distance);
        for i in 0..cfg.num_layers {
            let w = self.block(i)?;
            t5_block_forward(&mut x, &w, &bias, cfg, b, l);
        }
        let mut out = vec![0f32; n * d];
        t5_layernorm_forward(&mut out, &x, &self.weight("encoder.final_layer_norm.weight")?, n, d, cfg.eps);
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer.
// ---------------------------------------------------------------------------------------------------------------

/// The T5 tokenizer: a `tokenizers` Unigram model, from an HF tokenizer.json or built from spiece.model.
pub struct T5Tokenizer {
    tok: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
}

/// What the tokenizer needs from a SentencePiece ModelProto.
struct SpmModel {
    /// (piece, score, type): type 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
    pieces: Vec<(String, f32, u64)>,
    unk_id: Option<u64>,
    /// TrainerSpec.model_type: 1 unigram (the default), 2 BPE, 3 word, 4 char.
    model_type: u64,
    charsmap: Vec<u8>,
}

/// A minimal protobuf reader: varints, length-delimited fields, fixed32/64; groups are rejected.
struct Pb<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Pb<'a> {
    fn new(buf: &'a [u8]) -> Pb<'a> {
        Pb { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).context("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).context("field runs past the end")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next (field number, wire type), or None at the end.
    fn field(&mut self) -> Result<Option<(u64, u64)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        Ok(Some((tag >> 3, tag & 7)))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()? as usize;
        self.take(n)
    }

    fn skip(&mut self, wire: u64) -> Result<()> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.take(8).map(|_| ()),
            2 => self.bytes().map(|_| ()),
            5 => self.take(4).map(|_| ()),
            w => bail!("unsupported protobuf wire type {w}"),
        }
    }
}

fn parse_spiece(buf: &[u8]) -> Result<SpmModel> {
    let mut m = SpmModel { pieces: Vec::new(), unk_id: None, model_type: 1, charsmap: Vec::new() };
    let mut pb = Pb::new(buf);
    while let Some((field, wire)) = pb.field()? {
        match (field, wire) {
            (1, 2) => {
                let mut p = Pb::new(pb.bytes()?);
                let (mut piece, mut score, mut ty) = (None, 0f32, 1u64);
                while let Some((f, w)) = p.field()? {
                    match (f, w) {
                        (1, 2) => piece = Some(String::from_utf8(p.bytes()?.to_vec()).context("piece is not UTF-8")?),
                        (2, 5) => score = f32::from_le_bytes(p.take(4)?.try_into().unwrap()),
                        (3, 0) => ty = p.varint()?,
                        (_, w) => p.skip(w)?,
                    }
                }
                let piece = piece.with_context(|| format!("piece {} has no string", m.pieces.len()))?;
                m.pieces.push((piece, score, ty));
            }
            (2, 2) => {
                let mut t = Pb::new(pb.bytes()?);
                while let Some((f, w)) = t.field()? {
                    match (f, w) {
                        (3, 0) => m.model_type = t.varint()?,
                        (40, 0) => m.unk_id = Some(t.varint()?),
                        (_, w) => t.skip(w)?,
                    }
                }
            }
            (3, 2) => {
                let mut n = Pb::new(pb.bytes()?);
                while let Some((f, w)) = n.field()? {
                    match (f, w) {
                        (2, 2) => m.charsmap = n.bytes()?.to_vec(),
                        (_, w) => n.skip(w)?,
                    }
                }
            }
            (_, w) => pb.skip(w)?,
        }
    }
    Ok(m)
}

/// Number of `<extra_id_N>` sentinels HF's T5 tokenizer appends after the SentencePiece vocabulary.
const T5_EXTRA_IDS: usize = 100;

/// Builds the tokenizer HF's T5Tokenizer (transformers 5) builds from spiece.model: Unigram over the pieces plus
/// 100 sentinels `<extra_id_99>` … `<extra_id_0>`, the precompiled charsmap as normaliser, WhitespaceSplit then
/// Metaspace('▁', prepend always) as pre-tokeniser, and the control/unknown pieces and sentinels as special
/// tokens (matched in the raw text before normalisation).
fn tokenizer_from_spiece(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::unigram::Unigram;
    use tokenizers::normalizers::Precompiled;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    use tokenizers::AddedToken;

    let m = parse_spiece(bytes).with_context(|| format!("{}: not a SentencePiece model", path.display()))?;
    ensure!(!m.pieces.is_empty(), "{}: SentencePiece model has no pieces", path.display());
    ensure!(
        m.model_type == 1,
        "{}: SentencePiece model type {} is not unigram (T5 uses a unigram model)",
        path.display(),
        m.model_type
    );
    let unk_id = m.unk_id.or_else(|| m.pieces.iter().position(|p| p.2 == 2).map(|i| i as u64)).unwrap_or(0) as usize;
    ensure!(unk_id < m.pieces.len(), "{}: unk_id {unk_id} is outside the {} pieces", path.display(), m.pieces.len());
    let mut vocab: Vec<(String, f64)> = m.pieces.iter().map(|(p, s, _)| (p.clone(), *s as f64)).collect();
    let extra: Vec<String> = (0..T5_EXTRA_IDS).rev().map(|i| format!("<extra_id_{i}>")).collect();
    vocab.extend(extra.iter().map(|e| (e.clone(), 0.0)));
    let model = Unigram::from(vocab, Some(unk_id), false)
        .map_err(|e| anyhow::anyhow!("{}: cannot build the unigram model: {e}", path.display()))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    if !m.charsmap.is_empty() {
        super::check_charsmap(&m.charsmap, path)?;
        let norm = Precompiled::from(&m.charsmap)
            .map_err(|e| anyhow::anyhow!("{}: bad precompiled charsmap: {e}", path.display()))?;
        tok.with_normalizer(Some(norm));
    }
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    tok.with_pre_tokenizer(Some(Sequence::new(vec![WhitespaceSplit.into(), metaspace.clone().into()])));
    tok.with_decoder(Some(metaspace));
    let mut special: Vec<AddedToken> = m
        .pieces
        .iter()
        .enumerate()
        .filter(|(i, p)| p.2 == 3 || *i == unk_id)
        .map(|(_, p)| AddedToken::from(p.0.clone(), true))
        .collect();
    special.extend(extra.iter().map(|e| AddedToken::from(e.clone(), true)));
    tok.add_special_tokens(&special);
    let user: Vec<AddedToken> =
        m.pieces.iter().filter(|p| p.2 == 4).map(|p| AddedToken::from(p.0.clone(), false).normalized(false)).collect();
    tok.add_tokens(&user);
    Ok(tok)
}

impl T5Tokenizer {
    /// tokenizer.json (HF fast tokenizer) or spiece.model (SentencePiece protobuf, as FLUX.1-dev's tokenizer_2/
    /// ships it), or a folder holding either (tokenizer.json preferred, as HF does).
    pub fn open(path: &Path) -> Result<T5Tokenizer> {
        let file = if path.is_dir() {
            let json = path.join("tokenizer.json");
            let spm = path.join("spiece.model");
            if json.is_file() {
                json
            } else if spm.is_file() {
                spm
            } else {
                bail!("{}: no tokenizer.json or spiece.model in this folder", path.display());
            }
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let is_json = file.extension().is_some_and(|e| e == "json") || bytes.first() == Some(&b'{');
        let mut tok = if is_json {
            super::check_tokenizer_json(&bytes, &file)?;
            super::guarded(file.display(), || {
                tokenizers::Tokenizer::from_bytes(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: not a valid tokenizer.json: {e}", file.display()))
            })?
        } else {
            super::guarded(file.display(), || tokenizer_from_spiece(&bytes, &file))?
        };
        // Padding and truncation are done here, whatever the file has baked in.
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| anyhow::anyhow!("{e}"))?;
        let id = |t: &str| {
            tok.token_to_id(t).with_context(|| format!("{}: no `{t}` token: not a T5 tokenizer", file.display()))
        };
        let (eos, pad) = (id("</s>")?, id("<pad>")?);
        Ok(T5Tokenizer { tok, eos, pad })
    }

    /// The `</s>` id (1 for T5).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The `<pad>` id (0 for T5).
    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// Vocabulary size including the added special tokens (32100 for T5).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// Token ids with EOS appended, truncated to `max_len` keeping EOS last (HF `truncation=True`), padded with
    /// the pad id to exactly `max_len` (FLUX.1-dev: 512; schnell: 256).
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        check_max_len(max_len)?;
        let text = super::bounded_prompt(text);
        // A malformed charsmap can make the normaliser index out of bounds (tools/fuzz.sh).
        let enc = super::guarded("T5 tokenizer", || {
            self.tok.encode(text, false).map_err(|e| anyhow::anyhow!("T5 tokenizer: {e}"))
        })?;
        let mut ids: Vec<u32> = enc.get_ids().iter().copied().take(max_len - 1).collect();
        ids.push(self.eos);
        ids.resize(max_len, self.pad);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{rel_l2, Rng};

    #[test]
    fn buckets_match_hf_at_known_points() {
        // Values of HF `_relative_position_bucket(rel, True, 32, 128)`.
        let known = [
            (0, 0),
            (-1, 1),
            (1, 17),
            (-7, 7),
            (7, 23),
            (-8, 8),
            (8, 24),
            (-12, 9),
            (12, 25),
            (-15, 9),
            (15, 25),
            (-16, 10),
            (16, 26),
            (-23, 11),
            (-32, 12),
            (-64, 14),
            (-100, 15),
            (-127, 15),
            (127, 31),
            (128, 31),
            (-511, 15),
            (511, 31),
        ];
        for (rel, want) in known {
            assert_eq!(relative_position_bucket(rel, 32, 128), want, "rel {rel}");
        }
    }

    #[test]
    fn attention_with_zero_bias_is_unscaled_softmax() {
        let (b, h, l, d) = (1, 2, 5, 3);
        let mut rng = Rng::new(3);
        let q = rng.normal_vec(b * h * l * d, 1.0);
        let k = rng.normal_vec(b * h * l * d, 1.0);
        let v = rng.normal_vec(b * h * l * d, 1.0);
        let bias = rng.normal_vec(h * l * l, 1.0);
        let mut out = vec![0f32; q.len()];
        t5_attention_forward(&mut out, &q, &k, &v, &bias, b, h, l, d);
        let mut want = vec![0f32; q.len()];
        for hh in 0..h {
            for i in 0..l {
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        let dot: f64 =
                            (0..d).map(|x| q[(hh * l + i) * d + x] as f64 * k[(hh * l + j) * d + x] as f64).sum();
                        dot + bias[(hh * l + i) * l + j] as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for x in 0..d {
                    want[(hh * l + i) * d + x] =
                        (0..l).map(|j| (s[j] - mx).exp() / z * v[(hh * l + j) * d + x] as f64).sum::<f64>() as f32;
                }
            }
        }
        assert!(rel_l2(&out, &want) < 1e-6);
    }

    #[test]
    fn position_bias_gathers_by_distance() {
        let (l, h, nb) = (4, 2, 32);
        let table: Vec<f32> = (0..nb * h).map(|i| i as f32).collect();
        let mut bias = vec![0f32; h * l * l];
        position_bias_forward(&mut bias, &table, l, h, nb, 128);
        for hh in 0..h {
            for i in 0..l {
                for j in 0..l {
                    let bk = relative_position_bucket(j as i64 - i as i64, nb, 128);
                    assert_eq!(bias[(hh * l + i) * l + j], table[bk * h + hh]);
                }
            }
        }
    }

    #[test]
    fn protobuf_reader_rejects_truncation() {
        // Field 1 (pieces), length 5, but only 2 bytes follow.
        assert!(parse_spiece(&[0x0a, 0x05, 0x0a, 0x01]).is_err());
        assert!(parse_spiece(&[0xff]).is_err());
    }
}
