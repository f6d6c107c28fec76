//! The whole transformer forward (BFL `Flux.forward`), and the inputs it takes.

use super::adapt::{AdapterGrads, LinearAdapters};
use super::attention::Rope;
use super::config::FluxConfig;
use super::double_block::{
    double_block_backward, double_block_forward, ln_modulate, ln_modulate_backward, modulation_backward,
    modulation_forward, Dims, DoubleCache, LnMod,
};
use super::embed::{cond_inputs, conditioning_backward, conditioning_forward, CondInputs};
use super::single_block::{single_block_backward, single_block_forward, SingleCache, SingleDims};
use super::weights::FluxWeights;
use crate::io::safetensors::SafeTensors;
use crate::ops::rope::rope_tables;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// One batch of inputs, f32, with position ids broadcast to [b, tokens, 3].
#[derive(Clone, Debug)]
pub struct FluxInputs {
    pub b: usize,
    pub n_img: usize,
    pub n_txt: usize,
    /// Packed latents [b, n_img, in_channels].
    pub img: Vec<f32>,
    pub img_ids: Vec<f32>,
    /// T5 states [b, n_txt, context_in_dim].
    pub txt: Vec<f32>,
    pub txt_ids: Vec<f32>,
    /// CLIP pooled [b, vec_in_dim].
    pub y: Vec<f32>,
    /// Sigma in [0, 1] [b].
    pub timesteps: Vec<f32>,
    /// The guidance scale itself (3.5), [b]; only for models with a guidance embedding.
    pub guidance: Option<Vec<f32>>,
}

const INPUT_NAMES: [&str; 7] = ["img", "img_ids", "txt", "txt_ids", "y", "timesteps", "guidance"];

impl FluxInputs {
    /// Reads and validates the `forward` inputs file against the model's shapes.
    pub fn from_file(path: &Path, cfg: &FluxConfig) -> Result<FluxInputs> {
        let st = SafeTensors::open(path)?;
        let p = path.display();
        for name in st.tensors().keys() {
            if !INPUT_NAMES.contains(&name.as_str()) {
                bail!("{p}: unexpected tensor `{name}` (inputs are {})", INPUT_NAMES.join(", "));
            }
        }
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            if st.info(name).is_none() {
                bail!("{p}: missing tensor `{name}`");
            }
            let (shape, v) = st.read_f32(name)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("{p}: tensor `{name}` has a non-finite value at flat index {i}");
            }
            Ok((shape, v))
        };
        let want = |name: &str, got: &[usize], want: &[usize]| -> Result<()> {
            if got != want {
                bail!("{p}: tensor `{name}` has shape {got:?}, expected {want:?}");
            }
            Ok(())
        };
        let (s, img) = get("img")?;
        if s.len() != 3 {
            bail!("{p}: tensor `img` has shape {s:?}, expected [B, N, {}]", cfg.in_channels);
        }
        let (b, n_img) = (s[0], s[1]);
        want("img", &s, &[b, n_img, cfg.in_channels])?;
        if b == 0 || n_img == 0 {
            bail!("{p}: tensor `img` has shape {s:?}: the batch and the token count must be at least 1");
        }
        let (s, txt) = get("txt")?;
        if s.len() != 3 {
            bail!("{p}: tensor `txt` has shape {s:?}, expected [{b}, L, {}]", cfg.context_in_dim);
        }
        let n_txt = s[1];
        want("txt", &s, &[b, n_txt, cfg.context_in_dim])?;
        let ids = |name: &str, n: usize| -> Result<Vec<f32>> {
            let (s, v) = get(name)?;
            if s == [n, 3] {
                Ok((0..b).flat_map(|_| v.iter().copied()).collect())
            } else if s == [b, n, 3] {
                Ok(v)
            } else {
                bail!("{p}: tensor `{name}` has shape {s:?}, expected [{n}, 3] or [{b}, {n}, 3]")
            }
        };
        let img_ids = ids("img_ids", n_img)?;
        let txt_ids = ids("txt_ids", n_txt)?;
        let (s, y) = get("y")?;
        want("y", &s, &[b, cfg.vec_in_dim])?;
        let (s, timesteps) = get("timesteps")?;
        want("timesteps", &s, &[b])?;
        let guidance = match (cfg.guidance_embed, st.info("guidance").is_some()) {
            (true, true) => {
                let (s, g) = get("guidance")?;
                want("guidance", &s, &[b])?;
                Some(g)
            }
            (true, false) => bail!(
                "{p}: missing tensor `guidance` [{b}]: this model has a guidance embedding (FLUX.1-dev; e.g. 3.5)"
            ),
            (false, true) => {
                bail!("{p}: tensor `guidance` given but this model has no guidance embedding (schnell-like)")
            }
            (false, false) => None,
        };
        if n_img == 0 {
            bail!("{p}: `img` has no tokens");
        }
        Ok(FluxInputs { b, n_img, n_txt, img, img_ids, txt, txt_ids, y, timesteps, guidance })
    }
}

/// RoPE tables for the joint sequence (text ids first, then image ids), [b, l, head_dim/2].
pub fn joint_rope(cfg: &FluxConfig, inp: &FluxInputs) -> Rope {
    let l = inp.n_txt + inp.n_img;
    let mut ids = Vec::with_capacity(inp.b * l * 3);
    for bi in 0..inp.b {
        ids.extend_from_slice(&inp.txt_ids[bi * inp.n_txt * 3..(bi + 1) * inp.n_txt * 3]);
        ids.extend_from_slice(&inp.img_ids[bi * inp.n_img * 3..(bi + 1) * inp.n_img * 3]);
    }
    let half = cfg.head_dim / 2;
    let mut rope = Rope { cos: vec![0.0; inp.b * l * half], sin: vec![0.0; inp.b * l * half] };
    rope_tables(&mut rope.cos, &mut rope.sin, &ids, &cfg.rope_axes, cfg.theta);
    rope
}

/// Everything the backward pass needs from one forward pass.
pub struct FluxCache {
    cond: CondInputs,
    vec: Vec<f32>,
    rope: Rope,
    double: Vec<DoubleCache>,
    single: Vec<SingleCache>,
    final_mods: Vec<Vec<f32>>,
    final_ln: LnMod,
}

/// One forward pass: velocity prediction [b, n_img, out_channels].
pub fn flux_forward(cfg: &FluxConfig, w: &FluxWeights, inp: &FluxInputs, ad: &dyn LinearAdapters) -> Result<Vec<f32>> {
    Ok(forward_impl(cfg, w, inp, ad, false)?.0)
}

/// The forward pass keeping every block's intermediates for `flux_backward`.
pub fn flux_forward_train(
    cfg: &FluxConfig,
    w: &FluxWeights,
    inp: &FluxInputs,
    ad: &dyn LinearAdapters,
) -> Result<(Vec<f32>, FluxCache)> {
    let (y, c) = forward_impl(cfg, w, inp, ad, true)?;
    Ok((y, c.expect("kept")))
}

fn forward_impl(
    cfg: &FluxConfig,
    w: &FluxWeights,
    inp: &FluxInputs,
    ad: &dyn LinearAdapters,
    keep: bool,
) -> Result<(Vec<f32>, Option<FluxCache>)> {
    let (b, li, lt) = (inp.b, inp.n_img, inp.n_txt);
    let (h, d, c) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
    let l = lt + li;
    let mut img = w.img_in.apply(&inp.img, b * li, ad).context("img_in")?;
    let cond = cond_inputs(&inp.timesteps, inp.guidance.as_deref(), cfg.time_dim);
    let vec = conditioning_forward(w, &cond, &inp.y, b, ad)?;
    let mut txt = w.txt_in.apply(&inp.txt, b * lt, ad).context("txt_in")?;
    let rope = joint_rope(cfg, inp);

    let dims = Dims { b, lt, li, h, d };
    let mut double = Vec::new();
    for (i, blk) in w.double_blocks.iter().enumerate() {
        let cache = double_block_forward(blk, &mut img, &mut txt, &vec, &rope, dims, ad)
            .with_context(|| format!("double_blocks.{i}"))?;
        if keep {
            double.push(cache);
        }
    }
    let mut x = join_sequence(&txt, &img, b, lt, li, c);
    let sd = SingleDims { b, l, h, d, mlp: cfg.mlp_hidden };
    let mut single = Vec::new();
    for (i, blk) in w.single_blocks.iter().enumerate() {
        let cache =
            single_block_forward(blk, &mut x, &vec, &rope, sd, ad).with_context(|| format!("single_blocks.{i}"))?;
        if keep {
            single.push(cache);
        }
    }
    let (_, img) = split_sequence(&x, b, lt, li, c);
    // Final layer: [shift, scale] (BFL order), LN, modulate, linear.
    let final_mods = modulation_forward(&w.final_mod, &vec, b, 2, ad)?;
    let final_ln = ln_modulate(&img, &final_mods[0], &final_mods[1], b, li, c);
    let out = w.final_linear.apply(&final_ln.out, b * li, ad).context("final_layer.linear")?;
    let cache = keep.then_some(FluxCache { cond, vec, rope, double, single, final_mods, final_ln });
    Ok((out, cache))
}

/// x = cat(txt, img) along the sequence, per sample.
fn join_sequence(txt: &[f32], img: &[f32], b: usize, lt: usize, li: usize, c: usize) -> Vec<f32> {
    let l = lt + li;
    let mut x = vec![0f32; b * l * c];
    for bi in 0..b {
        x[bi * l * c..(bi * l + lt) * c].copy_from_slice(&txt[bi * lt * c..(bi + 1) * lt * c]);
        x[(bi * l + lt) * c..(bi + 1) * l * c].copy_from_slice(&img[bi * li * c..(bi + 1) * li * c]);
    }
    x
}

/// The inverse of `join_sequence`: (txt, img).
fn split_sequence(x: &[f32], b: usize, lt: usize, li: usize, c: usize) -> (Vec<f32>, Vec<f32>) {
    let l = lt + li;
    let (mut txt, mut img) = (vec![0f32; b * lt * c], vec![0f32; b * li * c]);
    for bi in 0..b {
        txt[bi * lt * c..(bi + 1) * lt * c].copy_from_slice(&x[bi * l * c..(bi * l + lt) * c]);
        img[bi * li * c..(bi + 1) * li * c].copy_from_slice(&x[(bi * l + lt) * c..(bi + 1) * l * c]);
    }
    (txt, img)
}

/// Backward from d(out) [b, n_img, out_channels] to the gradients of every LoRA term in
/// `ad`. Frozen base weights get no gradient.
pub fn flux_backward(
    cfg: &FluxConfig,
    w: &FluxWeights,
    inp: &FluxInputs,
    cache: &FluxCache,
    dout: &[f32],
    ad: &dyn LinearAdapters,
) -> Result<AdapterGrads> {
    let (b, li, lt) = (inp.b, inp.n_img, inp.n_txt);
    let (h, d, c) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
    let l = lt + li;
    let mut g = AdapterGrads::default();
    let vec = &cache.vec;
    let mut dvec = vec![0f32; vec.len()];

    let dxm = w.final_linear.backward_new(dout, &cache.final_ln.out, b * li, ad, &mut g)?;
    let (dimg, dsh, dsc) = ln_modulate_backward(&cache.final_ln, &dxm, &cache.final_mods[1], b, li, c);
    modulation_backward(&w.final_mod, vec, &[dsh, dsc], b, &mut dvec, ad, &mut g)?;

    // Text tokens after the last single block get no gradient from the loss.
    let mut dx = join_sequence(&vec![0f32; b * lt * c], &dimg, b, lt, li, c);
    let sd = SingleDims { b, l, h, d, mlp: cfg.mlp_hidden };
    for (i, (blk, bc)) in w.single_blocks.iter().zip(&cache.single).enumerate().rev() {
        single_block_backward(blk, bc, &mut dx, vec, &mut dvec, &cache.rope, sd, ad, &mut g)
            .with_context(|| format!("single_blocks.{i} backward"))?;
    }
    let (mut dtxt, mut dimg) = split_sequence(&dx, b, lt, li, c);
    let dims = Dims { b, lt, li, h, d };
    for (i, (blk, bc)) in w.double_blocks.iter().zip(&cache.double).enumerate().rev() {
        double_block_backward(blk, bc, &mut dimg, &mut dtxt, vec, &mut dvec, &cache.rope, dims, ad, &mut g)
            .with_context(|| format!("double_blocks.{i} backward"))?;
    }
    w.txt_in.backward(None, &dtxt, &inp.txt, b * lt, ad, &mut g)?;
    w.img_in.backward(None, &dimg, &inp.img, b * li, ad, &mut g)?;
    conditioning_backward(w, &cache.cond, &inp.y, &dvec, b, ad, &mut g)?;
    Ok(g)
}
