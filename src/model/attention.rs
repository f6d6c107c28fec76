//! The attention core both block kinds share: QK-RMSNorm per head, RoPE on q and k, then
//! softmax attention over the joint [txt ; img] sequence.

use crate::ops::attention::attention_forward;
use crate::ops::norm::rmsnorm_forward;
use crate::ops::rope::rope_forward;
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

/// RMSNorm over head_dim, applied to the token rows `rows` of every (batch, head).
pub fn head_rmsnorm(x: &mut [f32], weight: &[f32], b: usize, h: usize, l: usize, d: usize, rows: Range<usize>) {
    let mut rstd = vec![0f32; rows.len()];
    for bh in 0..b * h {
        let s = &mut x[(bh * l + rows.start) * d..(bh * l + rows.end) * d];
        rmsnorm_forward(s, &mut rstd, weight, rows.len(), d, QK_NORM_EPS);
    }
}

/// RoPE on q and k (never v), then attention. Returns o [b, h, l, d].
pub fn rope_attention(qkv: &mut Qkv, rope: &Rope, b: usize, h: usize, l: usize, d: usize) -> Vec<f32> {
    rope_forward(&mut qkv.q, &rope.cos, &rope.sin, b, h, l, d);
    rope_forward(&mut qkv.k, &rope.cos, &rope.sin, b, h, l, d);
    let mut o = vec![0f32; b * h * l * d];
    let mut lse = vec![0f32; b * h * l];
    attention_forward(&mut o, &mut lse, &qkv.q, &qkv.k, &qkv.v, b, h, l, d);
    o
}
