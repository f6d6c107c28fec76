//! DoubleStreamBlock (BFL `layers.py`): separate weights for the image and text streams,
//! joined only in attention. Order of operations as shared/reference/flux-architecture.md §2.7.

use super::attention::{head_rmsnorm, rope_attention, Qkv, Rope};
use super::weights::{DoubleBlock, Linear};
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
pub fn ln_modulate(
    x: &[f32],
    shift: &[f32],
    scale: &[f32],
    b: usize,
    l: usize,
    c: usize,
) -> Vec<f32> {
    let mut n = vec![0f32; x.len()];
    let (mut mean, mut rstd) = (vec![0f32; b * l], vec![0f32; b * l]);
    layernorm_forward(&mut n, &mut mean, &mut rstd, x, b * l, c, LN_EPS);
    let mut m = vec![0f32; x.len()];
    modulate_forward(&mut m, &n, shift, scale, b, l, c);
    m
}

/// Linear → GELU-tanh → Linear.
pub fn mlp_forward(
    l0: &Linear,
    l2: &Linear,
    x: &[f32],
    rows: usize,
    loras: &LoraSet,
) -> Result<Vec<f32>> {
    let hdn = l0.apply(x, rows, loras)?;
    let mut act = vec![0f32; hdn.len()];
    gelu_tanh_forward(&mut act, &hdn);
    l2.apply(&act, rows, loras)
}

/// Modulation vectors of one stream: Linear(SiLU(vec)) split into `n` chunks [b, c].
pub fn modulation_forward(
    lin: &Linear,
    vec: &[f32],
    b: usize,
    n: usize,
    loras: &LoraSet,
) -> Result<Vec<Vec<f32>>> {
    let mut act = vec![0f32; vec.len()];
    silu_forward(&mut act, vec);
    let mods = lin.apply(&act, b, loras)?;
    Ok(split_chunks(&mods, b, n, lin.d_in))
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
    // [shift1, scale1, gate1, shift2, scale2, gate2]
    let im = modulation_forward(&w.img_mod, vec, b, 6, loras)?;
    let tm = modulation_forward(&w.txt_mod, vec, b, 6, loras)?;

    let img_m = ln_modulate(img, &im[0], &im[1], b, li, c);
    let img_qkv = w.img_qkv.apply(&img_m, b * li, loras)?;
    let txt_m = ln_modulate(txt, &tm[0], &tm[1], b, lt, c);
    let txt_qkv = w.txt_qkv.apply(&txt_m, b * lt, loras)?;

    // Joint sequence, text first.
    let mut qkv = Qkv::zeros(b * h * l * d);
    for (j, dst) in [&mut qkv.q, &mut qkv.k, &mut qkv.v].into_iter().enumerate() {
        split_heads(dst, &txt_qkv, b, lt, 3 * c, j * c, h, d, l, 0);
        split_heads(dst, &img_qkv, b, li, 3 * c, j * c, h, d, l, lt);
    }
    head_rmsnorm(&mut qkv.q, &w.txt_q_norm.load()?, b, h, l, d, 0..lt);
    head_rmsnorm(&mut qkv.k, &w.txt_k_norm.load()?, b, h, l, d, 0..lt);
    head_rmsnorm(&mut qkv.q, &w.img_q_norm.load()?, b, h, l, d, lt..l);
    head_rmsnorm(&mut qkv.k, &w.img_k_norm.load()?, b, h, l, d, lt..l);
    let o = rope_attention(&mut qkv, rope, b, h, l, d);

    let mut txt_a = vec![0f32; b * lt * c];
    merge_heads(&mut txt_a, &o, b, lt, c, 0, h, d, l, 0);
    let mut img_a = vec![0f32; b * li * c];
    merge_heads(&mut img_a, &o, b, li, c, 0, h, d, l, lt);

    let p = w.img_proj.apply(&img_a, b * li, loras)?;
    gated_residual_forward(img, &p, &im[2], b, li, c);
    let m = mlp_forward(
        &w.img_mlp0,
        &w.img_mlp2,
        &ln_modulate(img, &im[3], &im[4], b, li, c),
        b * li,
        loras,
    )?;
    gated_residual_forward(img, &m, &im[5], b, li, c);

    let p = w.txt_proj.apply(&txt_a, b * lt, loras)?;
    gated_residual_forward(txt, &p, &tm[2], b, lt, c);
    let m = mlp_forward(
        &w.txt_mlp0,
        &w.txt_mlp2,
        &ln_modulate(txt, &tm[3], &tm[4], b, lt, c),
        b * lt,
        loras,
    )?;
    gated_residual_forward(txt, &m, &tm[5], b, lt, c);
    Ok(())
}
