//! A ViT image classifier in Hugging Face's `ViTForImageClassification` layout (`config.json` +
//! `model.safetensors`), CPU forward in f32, as `modeling_vit.py` computes it:
//! ```text
//! x = [cls; conv_p×p(pixels) flattened row-major] + position_embeddings      [1 + (H/p)(W/p), c]
//! per layer:  x += o(attention(q(LN_before x), k(…), v(…)))                    (no mask)
//!             x += fc2(gelu(fc1(LN_after x)))                                   exact (erf) GELU
//! logits = classifier(LN_final x[0])                                            the [CLS] token
//! ```
//! Stored names are those transformers writes (`vit.encoder.layer.N.attention.attention.query`,
//! `…attention.output.dense`, `…intermediate.dense`, `…output.dense`); transformers ≥ 5 renames
//! them in memory (q_proj, o_proj, fc1, fc2) but still saves these. Weights are decoded to f32
//! once at load (ViT-B/16: 86 M parameters, 343 MB), so each image costs only its forward.

use crate::io::read_json;
use crate::io::safetensors::{Dtype, SafeTensors};
use crate::ops::activation::gelu_erf;
use crate::ops::attention::{attention_forward, merge_heads, split_heads};
use crate::ops::matmul::linear_forward;
use crate::ops::norm::layernorm_affine_forward;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Widths (hidden, intermediate, labels, patch, image side) a config may ask for: ViT-H's widest
/// is 5,120. Sizes from a file are bounded before anything is sized by them.
const MAX_DIM: usize = 1 << 16;
/// Encoder layers (ViT-B 12, ViT-H 32).
const MAX_LAYERS: usize = 1024;
/// Tokens of one image (ViT-B/16 at 224²: 197).
const MAX_TOKENS: usize = 1 << 16;

/// Shape and constants of the classifier (HF `ViTConfig` names in the field docs).
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    /// `hidden_size` (768 for ViT-B).
    pub hidden: usize,
    /// `num_hidden_layers` (12).
    pub layers: usize,
    /// `num_attention_heads` (12).
    pub heads: usize,
    /// `intermediate_size` (3072).
    pub mlp: usize,
    /// `image_size` as (height, width) (224, 224).
    pub image: (usize, usize),
    /// `patch_size` as (height, width) (16, 16).
    pub patch: (usize, usize),
    /// `num_channels` (3).
    pub channels: usize,
    /// `layer_norm_eps` (1e-12).
    pub eps: f32,
    /// `qkv_bias` (true).
    pub qkv_bias: bool,
    /// `id2label` in index order (Falconsai: normal, nsfw).
    pub labels: Vec<String>,
}

impl VitConfig {
    /// Patches along (height, width): the conv's output size, floor(image / patch).
    pub fn grid(&self) -> (usize, usize) {
        (self.image.0 / self.patch.0, self.image.1 / self.patch.1)
    }

    /// Tokens per image: the patches and the [CLS] token.
    pub fn tokens(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw + 1
    }

    /// Every tensor the classifier reads, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (c, m) = (self.hidden, self.mlp);
        let e = "vit.embeddings.";
        let mut v = vec![
            (format!("{e}cls_token"), vec![1, 1, c]),
            (format!("{e}position_embeddings"), vec![1, self.tokens(), c]),
            (format!("{e}patch_embeddings.projection.weight"), vec![c, self.channels, self.patch.0, self.patch.1]),
            (format!("{e}patch_embeddings.projection.bias"), vec![c]),
        ];
        for i in 0..self.layers {
            let p = format!("vit.encoder.layer.{i}.");
            for proj in ["query", "key", "value"] {
                v.push((format!("{p}attention.attention.{proj}.weight"), vec![c, c]));
                if self.qkv_bias {
                    v.push((format!("{p}attention.attention.{proj}.bias"), vec![c]));
                }
            }
            v.push((format!("{p}attention.output.dense.weight"), vec![c, c]));
            v.push((format!("{p}attention.output.dense.bias"), vec![c]));
            for ln in ["layernorm_before", "layernorm_after"] {
                v.push((format!("{p}{ln}.weight"), vec![c]));
                v.push((format!("{p}{ln}.bias"), vec![c]));
            }
            v.push((format!("{p}intermediate.dense.weight"), vec![m, c]));
            v.push((format!("{p}intermediate.dense.bias"), vec![m]));
            v.push((format!("{p}output.dense.weight"), vec![c, m]));
            v.push((format!("{p}output.dense.bias"), vec![c]));
        }
        v.push(("vit.layernorm.weight".into(), vec![c]));
        v.push(("vit.layernorm.bias".into(), vec![c]));
        v.push(("classifier.weight".into(), vec![self.labels.len(), c]));
        v.push(("classifier.bias".into(), vec![self.labels.len()]));
        v
    }
}

/// `image_size` / `patch_size`: one number or [height, width].
#[derive(Deserialize)]
#[serde(untagged)]
enum Side {
    One(usize),
    Two([usize; 2]),
}

impl Side {
    fn hw(&self) -> (usize, usize) {
        match *self {
            Side::One(s) => (s, s),
            Side::Two([h, w]) => (h, w),
        }
    }
}

/// The fields of a ViT `config.json` that are read; missing ones take `ViTConfig`'s defaults,
/// as transformers does.
#[derive(Deserialize)]
struct HfVitConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    image_size: Option<Side>,
    patch_size: Option<Side>,
    num_channels: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    qkv_bias: Option<bool>,
    id2label: Option<BTreeMap<String, String>>,
}

/// Reads and checks a ViT `config.json`.
pub fn read_config(path: &Path) -> Result<VitConfig> {
    let j: HfVitConfig = read_json(path)?;
    let src = path.display();
    if let Some(t) = j.model_type.as_deref() {
        ensure!(t == "vit", "{src}: model_type `{t}`: expected `vit` (a ViTForImageClassification)");
    }
    let act = j.hidden_act.as_deref().unwrap_or("gelu");
    ensure!(
        act == "gelu",
        "{src}: hidden_act `{act}` is not supported; only `gelu` (the exact erf form, ViT's default) is implemented"
    );
    let mut labels = Vec::new();
    if let Some(map) = &j.id2label {
        let mut by_index = BTreeMap::new();
        for (k, v) in map {
            let i: usize = k.parse().with_context(|| format!("{src}: id2label key `{k}` is not an index"))?;
            by_index.insert(i, v.clone());
        }
        for (n, (i, v)) in by_index.into_iter().enumerate() {
            ensure!(i == n, "{src}: id2label has no label {n} (indices must run 0, 1, … without gaps)");
            labels.push(v);
        }
    }
    let cfg = VitConfig {
        hidden: j.hidden_size.unwrap_or(768),
        layers: j.num_hidden_layers.unwrap_or(12),
        heads: j.num_attention_heads.unwrap_or(12),
        mlp: j.intermediate_size.unwrap_or(3072),
        image: j.image_size.as_ref().map_or((224, 224), Side::hw),
        patch: j.patch_size.as_ref().map_or((16, 16), Side::hw),
        channels: j.num_channels.unwrap_or(3),
        eps: j.layer_norm_eps.unwrap_or(1e-12) as f32,
        qkv_bias: j.qkv_bias.unwrap_or(true),
        labels,
    };
    for (name, v, max) in [
        ("hidden_size", cfg.hidden, MAX_DIM),
        ("num_hidden_layers", cfg.layers, MAX_LAYERS),
        ("num_attention_heads", cfg.heads, MAX_DIM),
        ("intermediate_size", cfg.mlp, MAX_DIM),
        ("image_size", cfg.image.0.max(cfg.image.1), MAX_DIM),
        ("patch_size", cfg.patch.0.max(cfg.patch.1), MAX_DIM),
        ("id2label entries", cfg.labels.len(), MAX_DIM),
    ] {
        ensure!(
            v <= max,
            "{src}: {name} = {v}: at most {max} is supported (Falconsai's ViT-B/16: 768 wide, 12 layers)"
        );
    }
    ensure!(
        cfg.hidden > 0 && cfg.heads > 0 && cfg.hidden.is_multiple_of(cfg.heads),
        "{src}: hidden_size {} is not divisible by num_attention_heads {}",
        cfg.hidden,
        cfg.heads
    );
    ensure!(cfg.mlp > 0, "{src}: intermediate_size must be at least 1");
    ensure!(
        cfg.patch.0 > 0 && cfg.patch.1 > 0 && cfg.patch.0 <= cfg.image.0 && cfg.patch.1 <= cfg.image.1,
        "{src}: patch_size {:?} must be at least 1 and fit in image_size {:?}",
        cfg.patch,
        cfg.image
    );
    ensure!(cfg.tokens() <= MAX_TOKENS, "{src}: {} tokens per image: at most {MAX_TOKENS}", cfg.tokens());
    ensure!(
        cfg.channels == 3,
        "{src}: num_channels {}: the classifier reads RGB images, so 3 channels are needed",
        cfg.channels
    );
    ensure!(
        !cfg.labels.is_empty(),
        "{src}: no id2label: the classifier's labels (Falconsai: {{\"0\": \"normal\", \"1\": \"nsfw\"}}) are needed"
    );
    Ok(cfg)
}

/// One encoder layer's weights in f32 (names as HF's modules).
struct LayerWeights {
    layernorm_before: (Vec<f32>, Vec<f32>),
    query: (Vec<f32>, Option<Vec<f32>>),
    key: (Vec<f32>, Option<Vec<f32>>),
    value: (Vec<f32>, Option<Vec<f32>>),
    attention_output: (Vec<f32>, Vec<f32>),
    layernorm_after: (Vec<f32>, Vec<f32>),
    intermediate: (Vec<f32>, Vec<f32>),
    output: (Vec<f32>, Vec<f32>),
}

/// The classifier: config and f32 weights.
pub struct Vit {
    pub cfg: VitConfig,
    cls_token: Vec<f32>,
    position_embeddings: Vec<f32>,
    /// The conv [c, channels, ph, pw] read as a linear [c, channels·ph·pw] over flattened patches.
    patch_projection: (Vec<f32>, Vec<f32>),
    layers: Vec<LayerWeights>,
    layernorm: (Vec<f32>, Vec<f32>),
    classifier: (Vec<f32>, Vec<f32>),
}

/// Tensors a classifier file may carry that the forward does not use: the pooler of a `ViTModel`
/// (ViTForImageClassification has none and reads the [CLS] state directly).
fn is_ignored_key(name: &str) -> bool {
    name.starts_with("vit.pooler.")
}

impl Vit {
    /// Opens `model.safetensors` under the config: every tensor present, of its shape and a float
    /// dtype (F32, BF16, F16), and no tensor the layout does not explain.
    pub fn open(file: &Path, cfg: VitConfig) -> Result<Vit> {
        let st = SafeTensors::open(file)?;
        let fname = file.display().to_string();
        let expected = cfg.expected_tensors();
        for (name, shape) in &expected {
            let info = st.info(name).with_context(|| {
                format!(
                    "{fname}: missing tensor `{name}` (a ViTForImageClassification with {} layers, hidden {}, as \
                     config.json says; transformers saves these names)",
                    cfg.layers, cfg.hidden
                )
            })?;
            ensure!(
                &info.shape == shape,
                "{fname}: tensor `{name}` has shape {:?}, expected {shape:?} from config.json",
                info.shape
            );
            ensure!(
                matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16),
                "{fname}: tensor `{name}` has dtype {}; expected F32, BF16 or F16",
                info.dtype.name()
            );
        }
        let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(k) = st.tensors().keys().find(|k| !known.contains(k.as_str()) && !is_ignored_key(k)) {
            bail!(
                "{fname}: unexpected tensor `{k}` (not part of a {}-layer ViTForImageClassification with {} labels; \
                 check config.json)",
                cfg.layers,
                cfg.labels.len()
            );
        }
        let read = |n: &str| -> Result<Vec<f32>> { Ok(st.read_f32(n)?.1) };
        let pair = |p: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((read(&format!("{p}.weight"))?, read(&format!("{p}.bias"))?))
        };
        let qkv = |p: &str| -> Result<(Vec<f32>, Option<Vec<f32>>)> {
            let b = if cfg.qkv_bias { Some(read(&format!("{p}.bias"))?) } else { None };
            Ok((read(&format!("{p}.weight"))?, b))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("vit.encoder.layer.{i}.");
            layers.push(LayerWeights {
                layernorm_before: pair(&format!("{p}layernorm_before"))?,
                query: qkv(&format!("{p}attention.attention.query"))?,
                key: qkv(&format!("{p}attention.attention.key"))?,
                value: qkv(&format!("{p}attention.attention.value"))?,
                attention_output: pair(&format!("{p}attention.output.dense"))?,
                layernorm_after: pair(&format!("{p}layernorm_after"))?,
                intermediate: pair(&format!("{p}intermediate.dense"))?,
                output: pair(&format!("{p}output.dense"))?,
            });
        }
        Ok(Vit {
            cls_token: read("vit.embeddings.cls_token")?,
            position_embeddings: read("vit.embeddings.position_embeddings")?,
            patch_projection: pair("vit.embeddings.patch_embeddings.projection")?,
            layers,
            layernorm: pair("vit.layernorm")?,
            classifier: pair("classifier")?,
            cfg,
        })
    }

    /// logits [b, labels] of pixel_values [b, channels, H, W] at the model's image_size.
    pub fn logits(&self, pixel_values: &[f32], b: usize) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (c, ch) = (cfg.hidden, cfg.channels);
        let ((ih, iw), (ph, pw), (gh, gw)) = (cfg.image, cfg.patch, cfg.grid());
        ensure!(
            pixel_values.len() == b * ch * ih * iw,
            "ViT: {} pixel values for {b} images of {ch}×{ih}×{iw}",
            pixel_values.len()
        );
        let (np, l, k) = (gh * gw, cfg.tokens(), ch * ph * pw);
        // Patches as rows [b·np, channels·ph·pw], in the conv weight's (channel, y, x) order.
        let mut patches = vec![0f32; b * np * k];
        for bi in 0..b {
            for (p, row) in patches[bi * np * k..(bi + 1) * np * k].chunks_mut(k).enumerate() {
                let (py, px) = (p / gw, p % gw);
                for ci in 0..ch {
                    for y in 0..ph {
                        let src = ((bi * ch + ci) * ih + py * ph + y) * iw + px * pw;
                        row[(ci * ph + y) * pw..(ci * ph + y + 1) * pw].copy_from_slice(&pixel_values[src..src + pw]);
                    }
                }
            }
        }
        let mut embedded = vec![0f32; b * np * c];
        let (pw_, pb_) = &self.patch_projection;
        linear_forward(&mut embedded, &patches, pw_, Some(pb_), b * np, k, c);
        let mut x = vec![0f32; b * l * c];
        for bi in 0..b {
            let xb = &mut x[bi * l * c..(bi + 1) * l * c];
            xb[..c].copy_from_slice(&self.cls_token);
            xb[c..].copy_from_slice(&embedded[bi * np * c..(bi + 1) * np * c]);
            xb.iter_mut().zip(&self.position_embeddings).for_each(|(v, &p)| *v += p);
        }
        for w in &self.layers {
            self.layer_forward(&mut x, w, b);
        }
        // The final LayerNorm is per token, and the classifier reads only [CLS].
        let cls: Vec<f32> = (0..b).flat_map(|bi| x[bi * l * c..bi * l * c + c].iter().copied()).collect();
        let mut normed = vec![0f32; b * c];
        layernorm_affine_forward(&mut normed, &cls, &self.layernorm.0, &self.layernorm.1, b, c, cfg.eps);
        let n = cfg.labels.len();
        let mut logits = vec![0f32; b * n];
        linear_forward(&mut logits, &normed, &self.classifier.0, Some(&self.classifier.1), b, c, n);
        Ok(logits)
    }

    /// One pre-LN encoder layer, in place on the residual stream x [b, l, c].
    fn layer_forward(&self, x: &mut [f32], w: &LayerWeights, b: usize) {
        let cfg = &self.cfg;
        let (c, h, m, l) = (cfg.hidden, cfg.heads, cfg.mlp, cfg.tokens());
        let d = c / h;
        let rows = b * l;
        let mut ln = vec![0f32; rows * c];
        let mut y = vec![0f32; rows * c];

        layernorm_affine_forward(&mut ln, x, &w.layernorm_before.0, &w.layernorm_before.1, rows, c, cfg.eps);
        let mut heads = [vec![0f32; rows * c], vec![0f32; rows * c], vec![0f32; rows * c]];
        for (dst, (wt, bs)) in heads.iter_mut().zip([&w.query, &w.key, &w.value]) {
            linear_forward(&mut y, &ln, wt, bs.as_deref(), rows, c, c);
            split_heads(dst, &y, b, l, c, 0, h, d, l, 0);
        }
        let (mut att, mut lse) = (vec![0f32; rows * c], vec![0f32; b * h * l]);
        attention_forward(&mut att, &mut lse, &heads[0], &heads[1], &heads[2], b, h, l, d);
        merge_heads(&mut ln, &att, b, l, c, 0, h, d, l, 0);
        linear_forward(&mut y, &ln, &w.attention_output.0, Some(&w.attention_output.1), rows, c, c);
        x.iter_mut().zip(&y).for_each(|(x, &y)| *x += y);

        layernorm_affine_forward(&mut ln, x, &w.layernorm_after.0, &w.layernorm_after.1, rows, c, cfg.eps);
        let mut mid = vec![0f32; rows * m];
        linear_forward(&mut mid, &ln, &w.intermediate.0, Some(&w.intermediate.1), rows, c, m);
        mid.par_chunks_mut(1 << 14).for_each(|part| part.iter_mut().for_each(|v| *v = gelu_erf(*v)));
        linear_forward(&mut y, &mid, &w.output.0, Some(&w.output.1), rows, m, c);
        x.iter_mut().zip(&y).for_each(|(x, &y)| *x += y);
    }
}
