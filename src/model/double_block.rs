//! DoubleStreamBlock (BFL `layers.py`): separate weights for the image and text streams,
//! joined only in attention. Order of operations as docs/flux-model.md §2.7;
//! the backward walks it in reverse (docs/flux-model.md §7).

use super::adapt::{AdapterGrads, LinearAdapters};
use super::attention::{attention_block, attention_block_backward, AttnCache, AttnShape, Qkv, Rope};
use super::weights::{DoubleBlock, Linear, StreamWeights};
use crate::ops::activation::{gelu_tanh_backward, gelu_tanh_forward, silu_backward, silu_forward};
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::modulation::{
    gated_residual_backward, gated_residual_forward, join_chunks, modulate_backward, modulate_forward, split_chunks,
};
use crate::ops::norm::{layernorm_backward, layernorm_forward};
use anyhow::Result;
use std::ops::Range;

pub const LN_EPS: f32 = 1e-6;

/// Shapes of one call: batch, text tokens, image tokens, heads, head dim.
#[derive(Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub lt: usize,
    pub li: usize,
    pub h: usize,
    pub d: usize,
}

/// LN → (1 + scale)⊙n + shift, keeping what the backward needs.
pub struct LnMod {
    pub n: Vec<f32>,
    pub rstd: Vec<f32>,
    pub out: Vec<f32>,
}

pub fn ln_modulate(x: &[f32], shift: &[f32], scale: &[f32], b: usize, l: usize, c: usize) -> LnMod {
    let mut n = vec![0f32; x.len()];
    let (mut mean, mut rstd) = (vec![0f32; b * l], vec![0f32; b * l]);
    layernorm_forward(&mut n, &mut mean, &mut rstd, x, b * l, c, LN_EPS);
    let mut out = vec![0f32; x.len()];
    modulate_forward(&mut out, &n, shift, scale, b, l, c);
    LnMod { n, rstd, out }
}

/// Backward of `ln_modulate`: returns (dx, dshift, dscale).
pub fn ln_modulate_backward(
    m: &LnMod,
    dout: &[f32],
    scale: &[f32],
    b: usize,
    l: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dn = vec![0f32; dout.len()];
    let (mut dsh, mut dsc) = (vec![0f32; b * c], vec![0f32; b * c]);
    modulate_backward(&mut dn, &mut dsh, &mut dsc, dout, &m.n, scale, b, l, c);
    let mut dx = vec![0f32; dout.len()];
    layernorm_backward(&mut dx, &dn, &m.n, &m.rstd, b * l, c);
    (dx, dsh, dsc)
}

/// Linear → GELU-tanh → Linear, with its intermediates.
pub struct Mlp {
    pub h0: Vec<f32>,
    pub act: Vec<f32>,
    pub out: Vec<f32>,
}

pub fn mlp_forward(l0: &Linear, l2: &Linear, x: &[f32], rows: usize, ad: &dyn LinearAdapters) -> Result<Mlp> {
    let h0 = l0.apply(x, rows, ad)?;
    let mut act = vec![0f32; h0.len()];
    gelu_tanh_forward(&mut act, &h0);
    let out = l2.apply(&act, rows, ad)?;
    Ok(Mlp { h0, act, out })
}

pub fn mlp_backward(
    l0: &Linear,
    l2: &Linear,
    c: &Mlp,
    x: &[f32],
    dout: &[f32],
    rows: usize,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<Vec<f32>> {
    let dact = l2.backward_new(dout, &c.act, rows, ad, g)?;
    let mut dh0 = vec![0f32; dact.len()];
    gelu_tanh_backward(&mut dh0, &c.h0, &dact);
    l0.backward_new(&dh0, x, rows, ad, g)
}

/// Modulation vectors: Linear(SiLU(vec)) split into `n` chunks [b, c].
pub fn modulation_forward(
    lin: &Linear,
    vec: &[f32],
    b: usize,
    n: usize,
    ad: &dyn LinearAdapters,
) -> Result<Vec<Vec<f32>>> {
    let mut act = vec![0f32; vec.len()];
    silu_forward(&mut act, vec);
    let mods = lin.apply(&act, b, ad)?;
    Ok(split_chunks(&mods, b, n, lin.d_in))
}

/// Backward of `modulation_forward`: adds d vec into `dvec`.
pub fn modulation_backward(
    lin: &Linear,
    vec: &[f32],
    dmods: &[Vec<f32>],
    b: usize,
    dvec: &mut [f32],
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    let mut act = vec![0f32; vec.len()];
    silu_forward(&mut act, vec);
    let dm = join_chunks(dmods, b, lin.d_in);
    let dact = lin.backward_new(&dm, &act, b, ad, g)?;
    let mut dv = vec![0f32; vec.len()];
    silu_backward(&mut dv, vec, &dact);
    dvec.iter_mut().zip(&dv).for_each(|(a, b)| *a += b);
    Ok(())
}

/// One stream's intermediates.
pub struct StreamCache {
    /// [shift1, scale1, gate1, shift2, scale2, gate2], each [b, c]
    mods: Vec<Vec<f32>>,
    ln1: LnMod,
    /// Merged attention output (proj input) and proj output.
    a: Vec<f32>,
    p: Vec<f32>,
    ln2: LnMod,
    mlp: Mlp,
}

pub struct DoubleCache {
    img: StreamCache,
    txt: StreamCache,
    attn: AttnCache,
}

/// First half of a stream: modulation vectors, LN + modulate, qkv projection.
fn stream_qkv(
    w: &StreamWeights,
    x: &[f32],
    vec: &[f32],
    b: usize,
    l: usize,
    ad: &dyn LinearAdapters,
) -> Result<(Vec<Vec<f32>>, LnMod, Vec<f32>)> {
    let c = w.qkv.d_in;
    let mods = modulation_forward(&w.modulation, vec, b, 6, ad)?;
    let ln1 = ln_modulate(x, &mods[0], &mods[1], b, l, c);
    let qkv = w.qkv.apply(&ln1.out, b * l, ad)?;
    Ok((mods, ln1, qkv))
}

/// Second half: gated attention-projection residual, then the gated MLP residual (its LN sees
/// the stream after the attention residual).
fn stream_update(
    w: &StreamWeights,
    x: &mut [f32],
    a: Vec<f32>,
    mods: Vec<Vec<f32>>,
    ln1: LnMod,
    b: usize,
    l: usize,
    ad: &dyn LinearAdapters,
) -> Result<StreamCache> {
    let c = w.proj.d_out;
    let p = w.proj.apply(&a, b * l, ad)?;
    gated_residual_forward(x, &p, &mods[2], b, l, c);
    let ln2 = ln_modulate(x, &mods[3], &mods[4], b, l, c);
    let mlp = mlp_forward(&w.mlp0, &w.mlp2, &ln2.out, b * l, ad)?;
    gated_residual_forward(x, &mlp.out, &mods[5], b, l, c);
    Ok(StreamCache { mods, ln1, a, p, ln2, mlp })
}

/// (token rows, q weight, k weight): text rows use the text stream's norms, image rows the image's.
fn norms(q: &[[Vec<f32>; 2]; 2], lt: usize, l: usize) -> Vec<(Range<usize>, &[f32], &[f32])> {
    vec![(0..lt, &q[0][0][..], &q[0][1][..]), (lt..l, &q[1][0][..], &q[1][1][..])]
}

fn load_norms(w: &DoubleBlock) -> Result<[[Vec<f32>; 2]; 2]> {
    Ok([
        [w.txt.q_norm.load()?.into_owned(), w.txt.k_norm.load()?.into_owned()],
        [w.img.q_norm.load()?.into_owned(), w.img.k_norm.load()?.into_owned()],
    ])
}

/// Updates img [b, li, c] and txt [b, lt, c] in place; returns what the backward needs.
pub fn double_block_forward(
    w: &DoubleBlock,
    img: &mut [f32],
    txt: &mut [f32],
    vec: &[f32],
    rope: &Rope,
    dm: Dims,
    ad: &dyn LinearAdapters,
) -> Result<DoubleCache> {
    let Dims { b, lt, li, h, d } = dm;
    let c = h * d;
    let l = lt + li;
    let (im, iln, img_qkv) = stream_qkv(&w.img, img, vec, b, li, ad)?;
    let (tm, tln, txt_qkv) = stream_qkv(&w.txt, txt, vec, b, lt, ad)?;

    // Joint sequence, text first.
    let mut qkv = Qkv::zeros(b * h * l * d);
    for (j, dst) in [&mut qkv.q, &mut qkv.k, &mut qkv.v].into_iter().enumerate() {
        split_heads(dst, &txt_qkv, b, lt, 3 * c, j * c, h, d, l, 0);
        split_heads(dst, &img_qkv, b, li, 3 * c, j * c, h, d, l, lt);
    }
    let nw = load_norms(w)?;
    let shape = AttnShape { b, h, l, d };
    let attn = attention_block(qkv, &norms(&nw, lt, l), rope, &shape)?;

    let mut txt_a = vec![0f32; b * lt * c];
    merge_heads(&mut txt_a, &attn.o, b, lt, c, 0, h, d, l, 0);
    let mut img_a = vec![0f32; b * li * c];
    merge_heads(&mut img_a, &attn.o, b, li, c, 0, h, d, l, lt);

    let img_c = stream_update(&w.img, img, img_a, im, iln, b, li, ad)?;
    let txt_c = stream_update(&w.txt, txt, txt_a, tm, tln, b, lt, ad)?;
    Ok(DoubleCache { img: img_c, txt: txt_c, attn })
}

/// Backward of a stream's second half. `dx` holds d(stream output) on entry and d(stream
/// after attention residual's input) on exit; returns d(attention output) and fills dmods 2..6.
fn stream_update_backward(
    w: &StreamWeights,
    sc: &StreamCache,
    dx: &mut [f32],
    dmods: &mut [Vec<f32>],
    b: usize,
    l: usize,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<Vec<f32>> {
    let c = w.proj.d_out;
    let mut dmlp = vec![0f32; dx.len()];
    gated_residual_backward(&mut dmlp, &mut dmods[5], dx, &sc.mlp.out, &sc.mods[5], b, l, c);
    let dxm2 = mlp_backward(&w.mlp0, &w.mlp2, &sc.mlp, &sc.ln2.out, &dmlp, b * l, ad, g)?;
    let (dx2, dsh2, dsc2) = ln_modulate_backward(&sc.ln2, &dxm2, &sc.mods[4], b, l, c);
    (dmods[3], dmods[4]) = (dsh2, dsc2);
    dx.iter_mut().zip(&dx2).for_each(|(a, v)| *a += v);
    let mut dp = vec![0f32; dx.len()];
    gated_residual_backward(&mut dp, &mut dmods[2], dx, &sc.p, &sc.mods[2], b, l, c);
    w.proj.backward_new(&dp, &sc.a, b * l, ad, g)
}

/// Backward of a stream's first half: adds the input gradient into `dx` and d vec into `dvec`.
#[allow(clippy::too_many_arguments)]
fn stream_qkv_backward(
    w: &StreamWeights,
    sc: &StreamCache,
    dqkv: &[f32],
    dx: &mut [f32],
    mut dmods: Vec<Vec<f32>>,
    vec: &[f32],
    dvec: &mut [f32],
    b: usize,
    l: usize,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    let c = w.qkv.d_in;
    let dxm1 = w.qkv.backward_new(dqkv, &sc.ln1.out, b * l, ad, g)?;
    let (dx1, dsh1, dsc1) = ln_modulate_backward(&sc.ln1, &dxm1, &sc.mods[1], b, l, c);
    (dmods[0], dmods[1]) = (dsh1, dsc1);
    dx.iter_mut().zip(&dx1).for_each(|(a, v)| *a += v);
    modulation_backward(&w.modulation, vec, &dmods, b, dvec, ad, g)
}

/// Backward of `double_block_forward`: d_img, d_txt hold the output gradients on entry and the
/// input gradients on exit; d vec is added into `dvec`; LoRA gradients accumulate into `g`.
#[allow(clippy::too_many_arguments)]
pub fn double_block_backward(
    w: &DoubleBlock,
    cache: &DoubleCache,
    d_img: &mut [f32],
    d_txt: &mut [f32],
    vec: &[f32],
    dvec: &mut [f32],
    rope: &Rope,
    dm: Dims,
    ad: &dyn LinearAdapters,
    g: &mut AdapterGrads,
) -> Result<()> {
    let Dims { b, lt, li, h, d } = dm;
    let c = h * d;
    let l = lt + li;
    let zero = || vec![vec![0f32; b * c]; 6];
    let (mut dmi, mut dmt) = (zero(), zero());
    let da_img = stream_update_backward(&w.img, &cache.img, d_img, &mut dmi, b, li, ad, g)?;
    let da_txt = stream_update_backward(&w.txt, &cache.txt, d_txt, &mut dmt, b, lt, ad, g)?;

    let mut d_o = vec![0f32; b * h * l * d];
    split_heads(&mut d_o, &da_txt, b, lt, c, 0, h, d, l, 0);
    split_heads(&mut d_o, &da_img, b, li, c, 0, h, d, l, lt);
    let nw = load_norms(w)?;
    let shape = AttnShape { b, h, l, d };
    let dq = attention_block_backward(&cache.attn, &d_o, &norms(&nw, lt, l), rope, &shape)?;
    let (mut dq_txt, mut dq_img) = (vec![0f32; b * lt * 3 * c], vec![0f32; b * li * 3 * c]);
    for (j, src) in [&dq.q, &dq.k, &dq.v].into_iter().enumerate() {
        merge_heads(&mut dq_txt, src, b, lt, 3 * c, j * c, h, d, l, 0);
        merge_heads(&mut dq_img, src, b, li, 3 * c, j * c, h, d, l, lt);
    }
    stream_qkv_backward(&w.img, &cache.img, &dq_img, d_img, dmi, vec, dvec, b, li, ad, g)?;
    stream_qkv_backward(&w.txt, &cache.txt, &dq_txt, d_txt, dmt, vec, dvec, b, lt, ad, g)?;
    Ok(())
}
