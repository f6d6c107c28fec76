//! SingleStreamBlock (BFL `layers.py`): attention and MLP in parallel from one fused input
//! projection (linear1) and one fused output projection (linear2). docs/flux-model.md §2.8.

use super::adapt::{AdapterGrads, LinearAdapters};
use super::attention::{attention_block, attention_block_backward, AttnCache, AttnShape, Qkv, Rope};
use super::double_block::{ln_modulate, ln_modulate_backward, modulation_backward, modulation_forward, LnMod};
use super::weights::SingleBlock;
use crate::ops::activation::{gelu_tanh, gelu_tanh_grad};
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::modulation::{gated_residual_backward, gated_residual_forward};
use anyhow::Result;
use rayon::prelude::*;

/// Shapes: batch, joint tokens, heads, head dim, MLP width.
#[derive(Clone, Copy)]
pub struct SingleDims {
    pub b: usize,
    pub l: usize,
    pub h: usize,
    pub d: usize,
    pub mlp: usize,
}

pub struct SingleCache {
    /// [shift, scale, gate]
    mods: Vec<Vec<f32>>,
    ln: LnMod,
    /// linear1 output [b·l, 3c + mlp], linear2 input [b·l, c + mlp] and output [b·l, c].
    h1: Vec<f32>,
    cat: Vec<f32>,
    out: Vec<f32>,
    attn: AttnCache,
}

/// Updates x [b, l, c] (the joint [txt ; img] sequence) in place.
pub fn single_block_forward(
    w: &SingleBlock,
    x: &mut [f32],
    vec: &[f32],
    rope: &Rope,
    sd: SingleDims,
    ad: &dyn LinearAdapters,
) -> Result<SingleCache> {
    let SingleDims { b, l, h, d, mlp } = sd;
    let c = h * d;
    let mods = modulation_forward(&w.modulation, vec, b, 3, ad)?;
    let ln = ln_modulate(x, &mods[0], &mods[1], b, l, c);
    let w1 = 3 * c + mlp;
    let h1 = w.linear1.apply(&ln.out, b * l, ad)?;

    let mut qkv = Qkv::zeros(b * h * l * d);
    for (j, dst) in [&mut qkv.q, &mut qkv.k, &mut qkv.v].into_iter().enumerate() {
        split_heads(dst, &h1, b, l, w1, j * c, h, d, l, 0);
    }
    let (qn, kn) = (w.q_norm.load()?, w.k_norm.load()?);
    let attn = attention_block(qkv, &[(0..l, &qn, &kn)], rope, &AttnShape { b, h, l, d })?;

    // linear2 input: [attention output | GELU(mlp part of linear1)]
    let w2 = c + mlp;
    let mut cat = vec![0f32; b * l * w2];
    merge_heads(&mut cat, &attn.o, b, l, w2, 0, h, d, l, 0);
    cat.par_chunks_mut(w2).zip(h1.par_chunks(w1)).for_each(|(o, src)| {
        o[c..].iter_mut().zip(&src[3 * c..]).for_each(|(o, &v)| *o = gelu_tanh(v));
    });
    let out = w.linear2.apply(&cat, b * l, ad)?;
    gated_residual_forward(x, &out, &mods[2], b, l, c);
    Ok(SingleCache { mods, ln, h1, cat, out, attn })
}

/// Backward: `dx` holds d(output) on entry and d(input) on exit; d vec is added into `dvec`.
#[allow(clippy::too_many_arguments)]
pub fn single_block_backward(
    w: &SingleBlock,
    cache: &SingleCache,
    dx: &mut [f32],
    vec: &[f32],
    dvec: &mut [f32],
    rope: &Rope,
    sd: SingleDims,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    let SingleDims { b, l, h, d, mlp } = sd;
    let c = h * d;
    let (w1, w2) = (3 * c + mlp, c + mlp);
    let mut dmods = vec![vec![0f32; b * c]; 3];
    let mut dout = vec![0f32; dx.len()];
    gated_residual_backward(&mut dout, &mut dmods[2], dx, &cache.out, &cache.mods[2], b, l, c);
    let dcat = w.linear2.backward_new(&dout, &cache.cat, b * l, ad, g)?;

    let mut dh1 = vec![0f32; b * l * w1];
    dh1.par_chunks_mut(w1).zip(cache.h1.par_chunks(w1).zip(dcat.par_chunks(w2))).for_each(|(o, (src, dsrc))| {
        o[3 * c..].iter_mut().zip(&src[3 * c..]).zip(&dsrc[c..]).for_each(|((o, &v), &gd)| *o = gd * gelu_tanh_grad(v));
    });
    let mut d_o = vec![0f32; b * h * l * d];
    split_heads(&mut d_o, &dcat, b, l, w2, 0, h, d, l, 0);
    let (qn, kn) = (w.q_norm.load()?, w.k_norm.load()?);
    let dq = attention_block_backward(&cache.attn, &d_o, &[(0..l, &qn, &kn)], rope, &AttnShape { b, h, l, d })?;
    for (j, src) in [&dq.q, &dq.k, &dq.v].into_iter().enumerate() {
        merge_heads(&mut dh1, src, b, l, w1, j * c, h, d, l, 0);
    }
    let dxm = w.linear1.backward_new(&dh1, &cache.ln.out, b * l, ad, g)?;
    let (dx0, dsh, dsc) = ln_modulate_backward(&cache.ln, &dxm, &cache.mods[1], b, l, c);
    (dmods[0], dmods[1]) = (dsh, dsc);
    dx.iter_mut().zip(&dx0).for_each(|(a, v)| *a += v);
    modulation_backward(&w.modulation, vec, &dmods, b, dvec, ad, g)
}
