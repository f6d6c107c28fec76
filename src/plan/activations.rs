//! What one training step keeps on the GPU between the forward and the backward, per block, in
//! the op order of shared/reference/flux-architecture.md §2.7–2.8 (src/model/double_block.rs,
//! single_block.rs). The policy is the one a memory-aware GPU step follows: bf16 activations,
//! an elementwise op's output recomputed from its input rather than stored (GELU, modulate),
//! attention as flash attention (Q, K, V, O in bf16 and the f32 log-sum-exp per row), and the
//! f32 1/rms of every LayerNorm and QK RMSNorm row. (The CPU reference keeps more, in f32.)

use crate::model::config::FluxConfig;

const BF16: usize = 2;
const F32: usize = 4;

/// Tokens of one sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tokens {
    pub img: usize,
    pub txt: usize,
}

impl Tokens {
    pub fn joint(self) -> usize {
        self.img + self.txt
    }
}

/// Flash attention over `l` tokens: Q, K, V, O and the LSE; the QK RMSNorms' 1/rms per head.
pub fn attention_saved(cfg: &FluxConfig, l: usize) -> usize {
    4 * l * cfg.hidden_size * BF16 + l * cfg.num_heads * F32 + 2 * l * cfg.num_heads * F32
}

/// One stream of a double block over `n` tokens, attention excluded.
fn stream_saved(cfg: &FluxConfig, n: usize) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    n * c * BF16          // LN1 → modulate: the qkv input (LoRA dA; LN1 backward from it)
        + n * c * BF16    // proj output: the gate's gradient
        + n * c * BF16    // LN2 → modulate: the MLP input
        + n * m * BF16    // MLP pre-activation: GELU and its gradient recomputed from it
        + n * c * BF16    // MLP output: the second gate's gradient
        + 2 * n * F32 // 1/std of LN1 and LN2
}

/// A double block's saved set per sample.
pub fn double_block_saved(cfg: &FluxConfig, t: Tokens) -> usize {
    stream_saved(cfg, t.img) + stream_saved(cfg, t.txt) + attention_saved(cfg, t.joint())
}

/// A single block's saved set per sample (joint sequence of l tokens).
pub fn single_block_saved(cfg: &FluxConfig, t: Tokens) -> usize {
    let (l, c, m) = (t.joint(), cfg.hidden_size, cfg.mlp_hidden);
    l * c * BF16          // pre_norm → modulate: linear1's input
        + l * m * BF16    // linear1's MLP part before GELU (linear2's input recomputed from it and O)
        + l * c * BF16    // linear2 output: the gate's gradient
        + l * F32         // 1/std of the pre-norm
        + attention_saved(cfg, l)
}

/// A block's input: what per-block checkpointing keeps instead of the saved set.
pub fn block_input(cfg: &FluxConfig, t: Tokens) -> usize {
    t.joint() * cfg.hidden_size * BF16
}

/// Gradients alive inside one block's backward beyond its saved set: the largest pair of
/// adjacent gradient tensors (the MLP's in a double block, linear1's output and linear2's input
/// in a single block).
pub fn block_backward_transient(cfg: &FluxConfig, t: Tokens, single: bool) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    if single {
        t.joint() * ((3 * c + m) + (c + m)) * BF16
    } else {
        2 * t.img.max(t.txt) * m * BF16
    }
}

/// The residual stream and its gradient between blocks (bf16 values, f32 gradient).
pub fn stream_and_gradient(cfg: &FluxConfig, t: Tokens) -> usize {
    t.joint() * cfg.hidden_size * (BF16 + F32)
}

/// Tokens a module's input has: image, text, joint, or one modulation vector.
pub fn module_tokens(module: &str, t: Tokens) -> usize {
    let vector = module.contains("_mod.lin")
        || module.contains("modulation")
        || ["time_in", "vector_in", "guidance_in"].iter().any(|p| module.starts_with(p));
    if vector {
        1
    } else if module.starts_with("single_blocks.") {
        t.joint()
    } else if module.contains(".txt_") || module == "txt_in" {
        t.txt
    } else {
        t.img
    }
}
