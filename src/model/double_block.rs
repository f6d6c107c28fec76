//! DoubleStreamBlock (BFL `layers.py`): separate weights for the image and text streams,
//! joined only in attention. Order of operations as shared/reference/flux-architecture.md §2.7.

use super::attention::{head_rmsnorm, rope_attention, Qkv, Rope};
use super::weights::{DoubleBlock, Linear, StreamWeights};
use crate::lora::LoraSet;
use crate::ops::activation::{gelu_tanh_forward, silu_forward};
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::modulation::{gated_residual_forward, modulate_forward, split_chunks};
use crate::ops::norm::layernorm_forward;
use anyhow::Result;

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

/// (1 + scale) ⊙ LN(x) + shift over [b, l, c].
pub fn ln_modulate(x: &[f32], shift: &[f32], scale: &[f32], b: usize, l: usize, c: usize) -> Vec<f32> {
    let mut n = vec![0f32; x.len()];
    let (mut mean, mut rstd) = (vec![0f32; b * l], vec![0f32; b * l]);
    layernorm_forward(&mut n, &mut mean, &mut rstd, x, b * l, c, LN_EPS);
    let mut m = vec![0f32; x.len()];
    modulate_forward(&mut m, &n, shift, scale, b, l, c);
    m
}

/// Linear → GELU-tanh → Linear.
pub fn mlp_forward(l0: &Linear, l2: &Linear, x: &[f32], rows: usize, loras: &LoraSet) -> Result<Vec<f32>> {
    let hdn = l0.apply(x, rows, loras)?;
    let mut act = vec![0f32; hdn.len()];
    gelu_tanh_forward(&mut act, &hdn);
    l2.apply(&act, rows, loras)
}

/// Modulation vectors of one stream: Linear(SiLU(vec)) split into `n` chunks [b, c].
pub fn modulation_forward(lin: &Linear, vec: &[f32], b: usize, n: usize, loras: &LoraSet) -> Result<Vec<Vec<f32>>> {
    let mut act = vec![0f32; vec.len()];
    silu_forward(&mut act, vec);
    let mods = lin.apply(&act, b, loras)?;
    Ok(split_chunks(&mods, b, n, lin.d_in))
}

/// First half of a stream: its six modulation vectors [shift1, scale1, gate1, shift2, scale2,
/// gate2] and the qkv projection of the modulated, normalised tokens x [b, l, c].
fn stream_qkv(
    w: &StreamWeights,
    x: &[f32],
    vec: &[f32],
    b: usize,
    l: usize,
    loras: &LoraSet,
) -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
    let c = w.qkv.d_in;
    let mods = modulation_forward(&w.modulation, vec, b, 6, loras)?;
    let xm = ln_modulate(x, &mods[0], &mods[1], b, l, c);
    let qkv = w.qkv.apply(&xm, b * l, loras)?;
    Ok((mods, qkv))
}

/// Second half of a stream: gated attention-projection residual, then the gated MLP residual
/// (its LN sees the stream after the attention residual).
fn stream_update(
    w: &StreamWeights,
    x: &mut [f32],
    attn: &[f32],
    mods: &[Vec<f32>],
    b: usize,
    l: usize,
    loras: &LoraSet,
) -> Result<()> {
    let c = w.proj.d_out;
    let p = w.proj.apply(attn, b * l, loras)?;
    gated_residual_forward(x, &p, &mods[2], b, l, c);
    let xm = ln_modulate(x, &mods[3], &mods[4], b, l, c);
    let m = mlp_forward(&w.mlp0, &w.mlp2, &xm, b * l, loras)?;
    gated_residual_forward(x, &m, &mods[5], b, l, c);
    Ok(())
}

/// Updates img [b, li, c] and txt [b, lt, c] in place.
pub fn double_block_forward(
    w: &DoubleBlock,
    img: &mut [f32],
    txt: &mut [f32],
    vec: &[f32],
    rope: &Rope,
    dm: Dims,
    loras: &LoraSet,
) -> Result<()> {
    let Dims { b, lt, li, h, d } = dm;
    let c = h * d;
    let l = lt + li;
    let (im, img_qkv) = stream_qkv(&w.img, img, vec, b, li, loras)?;
    let (tm, txt_qkv) = stream_qkv(&w.txt, txt, vec, b, lt, loras)?;

    // Joint sequence, text first.
    let mut qkv = Qkv::zeros(b * h * l * d);
    for (j, dst) in [&mut qkv.q, &mut qkv.k, &mut qkv.v].into_iter().enumerate() {
        split_heads(dst, &txt_qkv, b, lt, 3 * c, j * c, h, d, l, 0);
        split_heads(dst, &img_qkv, b, li, 3 * c, j * c, h, d, l, lt);
    }
    for (sw, rows) in [(&w.txt, 0..lt), (&w.img, lt..l)] {
        head_rmsnorm(&mut qkv.q, &sw.q_norm.load()?, b, h, l, d, rows.clone());
        head_rmsnorm(&mut qkv.k, &sw.k_norm.load()?, b, h, l, d, rows);
    }
    let o = rope_attention(&mut qkv, rope, b, h, l, d);

    let mut txt_a = vec![0f32; b * lt * c];
    merge_heads(&mut txt_a, &o, b, lt, c, 0, h, d, l, 0);
    let mut img_a = vec![0f32; b * li * c];
    merge_heads(&mut img_a, &o, b, li, c, 0, h, d, l, lt);

    stream_update(&w.img, img, &img_a, &im, b, li, loras)?;
    stream_update(&w.txt, txt, &txt_a, &tm, b, lt, loras)?;
    Ok(())
}
