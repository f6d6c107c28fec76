//! SingleStreamBlock (BFL `layers.py`): attention and MLP in parallel from one fused input
//! projection (linear1) and one fused output projection (linear2). §2.8 of the reference.

use super::attention::{head_rmsnorm, rope_attention, Qkv, Rope};
use super::double_block::{ln_modulate, modulation_forward};
use super::weights::SingleBlock;
use crate::lora::LoraSet;
use crate::ops::activation::gelu_tanh;
use crate::ops::attention::{merge_heads, split_heads};
use crate::ops::modulation::gated_residual_forward;
use anyhow::Result;

/// Updates x [b, l, c] (the joint [txt ; img] sequence) in place. `mlp` is the MLP width.
pub fn single_block_forward(
    w: &SingleBlock,
    x: &mut [f32],
    vec: &[f32],
    rope: &Rope,
    b: usize,
    l: usize,
    h: usize,
    d: usize,
    mlp: usize,
    loras: &LoraSet,
) -> Result<()> {
    let c = h * d;
    // [shift, scale, gate]
    let md = modulation_forward(&w.modulation, vec, b, 3, loras)?;
    let xm = ln_modulate(x, &md[0], &md[1], b, l, c);
    let w1 = 3 * c + mlp;
    let h1 = w.linear1.apply(&xm, b * l, loras)?;

    let mut qkv = Qkv::zeros(b * h * l * d);
    for (j, dst) in [&mut qkv.q, &mut qkv.k, &mut qkv.v].into_iter().enumerate() {
        split_heads(dst, &h1, b, l, w1, j * c, h, d, l, 0);
    }
    head_rmsnorm(&mut qkv.q, &w.q_norm.load()?, b, h, l, d, 0..l);
    head_rmsnorm(&mut qkv.k, &w.k_norm.load()?, b, h, l, d, 0..l);
    let o = rope_attention(&mut qkv, rope, b, h, l, d);

    // linear2 input: [attention output | GELU(mlp part of linear1)]
    let w2 = c + mlp;
    let mut cat = vec![0f32; b * l * w2];
    merge_heads(&mut cat, &o, b, l, w2, 0, h, d, l, 0);
    for t in 0..b * l {
        let src = &h1[t * w1 + 3 * c..(t + 1) * w1];
        for (dst, &v) in cat[t * w2 + c..(t + 1) * w2].iter_mut().zip(src) {
            *dst = gelu_tanh(v);
        }
    }
    let out = w.linear2.apply(&cat, b * l, loras)?;
    gated_residual_forward(x, &out, &md[2], b, l, c);
    Ok(())
}
