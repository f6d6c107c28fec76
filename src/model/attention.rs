//! The attention core both block kinds share: QK-RMSNorm per head, RoPE on q and k, then
//! softmax attention over the joint [txt ; img] sequence; and its backward.

use crate::ops::attention::{attention_backward, attention_forward};
use crate::ops::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{rope_backward, rope_forward};
use anyhow::Result;
use std::ops::Range;

/// RMSNorm eps of FLUX's QKNorm.
pub const QK_NORM_EPS: f32 = 1e-6;

/// Position tables for the joint sequence: cos/sin [b, l, head_dim/2].
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// Head-major q, k, v [b, h, l, d] of the joint sequence.
pub struct Qkv {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl Qkv {
    pub fn zeros(n: usize) -> Qkv {
        Qkv { q: vec![0.0; n], k: vec![0.0; n], v: vec![0.0; n] }
    }
}

/// Shapes of the joint sequence and which token rows each QK-norm weight covers.
#[derive(Clone)]
pub struct AttnShape {
    pub b: usize,
    pub h: usize,
    pub l: usize,
    pub d: usize,
}

/// What the backward pass needs from the forward.
pub struct AttnCache {
    /// q, k before QK-norm, and the norms' rstd per (b, h, token).
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    q_rstd: Vec<f32>,
    k_rstd: Vec<f32>,
    /// q, k after norm and RoPE, v, the output and its log-sum-exp.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pub o: Vec<f32>,
    lse: Vec<f32>,
}

/// RMSNorm over head_dim of the token rows `rows` of every (batch, head); rstd saved per row.
fn head_rmsnorm(x: &mut [f32], rstd: &mut [f32], weight: &[f32], s: &AttnShape, rows: &Range<usize>) {
    let AttnShape { b, h, l, d } = *s;
    for bh in 0..b * h {
        let xs = &mut x[(bh * l + rows.start) * d..(bh * l + rows.end) * d];
        let rs = &mut rstd[bh * l + rows.start..bh * l + rows.end];
        rmsnorm_forward(xs, rs, weight, rows.len(), d, QK_NORM_EPS);
    }
}

fn head_rmsnorm_backward(
    dx: &mut [f32],
    raw: &[f32],
    rstd: &[f32],
    weight: &[f32],
    s: &AttnShape,
    rows: &Range<usize>,
) {
    let AttnShape { b, h, l, d } = *s;
    for bh in 0..b * h {
        let r = (bh * l + rows.start) * d..(bh * l + rows.end) * d;
        let rs = &rstd[bh * l + rows.start..bh * l + rows.end];
        let xhat: Vec<f32> = raw[r.clone()].iter().enumerate().map(|(i, &v)| v * rs[i / d]).collect();
        let dy = dx[r.clone()].to_vec();
        rmsnorm_backward(&mut dx[r], &dy, &xhat, rs, weight, rows.len(), d);
    }
}

/// QK-norm (one (q weight, k weight) per token range), RoPE on q and k (never v), attention.
pub fn attention_block(
    qkv: Qkv,
    norms: &[(Range<usize>, &[f32], &[f32])],
    rope: &Rope,
    s: &AttnShape,
) -> Result<AttnCache> {
    let AttnShape { b, h, l, d } = *s;
    let (q_raw, k_raw) = (qkv.q.clone(), qkv.k.clone());
    let Qkv { mut q, mut k, v } = qkv;
    let (mut q_rstd, mut k_rstd) = (vec![0f32; b * h * l], vec![0f32; b * h * l]);
    for (rows, qw, kw) in norms {
        head_rmsnorm(&mut q, &mut q_rstd, qw, s, rows);
        head_rmsnorm(&mut k, &mut k_rstd, kw, s, rows);
    }
    rope_forward(&mut q, &rope.cos, &rope.sin, b, h, l, d);
    rope_forward(&mut k, &rope.cos, &rope.sin, b, h, l, d);
    let mut o = vec![0f32; b * h * l * d];
    let mut lse = vec![0f32; b * h * l];
    attention_forward(&mut o, &mut lse, &q, &k, &v, b, h, l, d);
    Ok(AttnCache { q_raw, k_raw, q_rstd, k_rstd, q, k, v, o, lse })
}

/// Backward of `attention_block`: from dO [b, h, l, d] to the gradients of the raw q, k, v.
pub fn attention_block_backward(
    c: &AttnCache,
    d_o: &[f32],
    norms: &[(Range<usize>, &[f32], &[f32])],
    rope: &Rope,
    s: &AttnShape,
) -> Result<Qkv> {
    let AttnShape { b, h, l, d } = *s;
    let mut g = Qkv::zeros(b * h * l * d);
    attention_backward(&mut g.q, &mut g.k, &mut g.v, d_o, &c.q, &c.k, &c.v, &c.o, &c.lse, b, h, l, d);
    rope_backward(&mut g.q, &rope.cos, &rope.sin, b, h, l, d);
    rope_backward(&mut g.k, &rope.cos, &rope.sin, b, h, l, d);
    for (rows, qw, kw) in norms {
        head_rmsnorm_backward(&mut g.q, &c.q_raw, &c.q_rstd, qw, s, rows);
        head_rmsnorm_backward(&mut g.k, &c.k_raw, &c.k_rstd, kw, s, rows);
    }
    Ok(g)
}
