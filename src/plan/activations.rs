//! What one training step keeps on the GPU between the forward and the backward, per block, as
//! the device-resident step (src/engine/cuda/) allocates it, in the op order of
//! docs/flux-model.md §2.7–2.8. Its policy: the residual streams, LayerNorm
//! outputs and every linear's f32 output that a later backward reads stay f32; each linear's
//! input is kept once, as the bf16 copy the GEMM read; attention is flash attention (Q, K, V, O
//! in bf16, the f32 log-sum-exp and the QK RMSNorms' 1/rms per row); the LoRA terms' x·Aᵀ is
//! recomputed in the backward, not kept. (The CPU reference keeps more, in f32.) Where a count
//! here and the allocation in src/engine/cuda/ disagree, the code is right and this is a bug.

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

/// One stream of a double block over `n` tokens, attention excluded (`blocks::StreamAct`).
fn stream_saved(cfg: &FluxConfig, n: usize) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    6 * c * F32               // the six modulation vectors
        + n * c * F32         // LN1: normalised rows
        + n * c * BF16        // LN1 → modulate: the qkv input
        + 3 * n * c * F32     // qkv output: the QK prologue's input, read again by its backward
        + n * c * BF16        // merged attention output: the proj input
        + n * c * F32         // proj output: the gate's gradient
        + n * c * F32         // LN2: normalised rows
        + n * c * BF16        // LN2 → modulate: the MLP input
        + n * m * F32         // MLP pre-activation: GELU's backward
        + n * m * BF16        // GELU output: mlp.2's input
        + n * c * F32         // MLP output: the second gate's gradient
        + 2 * n * F32 // 1/std of LN1 and LN2
}

/// A double block's saved set per sample.
pub fn double_block_saved(cfg: &FluxConfig, t: Tokens) -> usize {
    stream_saved(cfg, t.img) + stream_saved(cfg, t.txt) + attention_saved(cfg, t.joint())
}

/// A single block's saved set per sample (joint sequence of l tokens; `blocks::SingleAct`).
pub fn single_block_saved(cfg: &FluxConfig, t: Tokens) -> usize {
    let (l, c, m) = (t.joint(), cfg.hidden_size, cfg.mlp_hidden);
    3 * c * F32                   // the three modulation vectors
        + l * c * F32             // pre-norm: normalised rows
        + l * c * BF16            // pre-norm → modulate: linear1's input
        + l * (3 * c + m) * F32   // linear1 output: QK prologue and GELU backwards read it
        + l * (c + m) * BF16      // [attention | GELU]: linear2's input
        + l * c * F32             // linear2 output: the gate's gradient
        + l * F32                 // 1/std of the pre-norm
        + attention_saved(cfg, l)
}

/// A block's input: what per-block checkpointing keeps instead of the saved set (f32, so the
/// recomputed forward is the same bits).
pub fn block_input(cfg: &FluxConfig, t: Tokens) -> usize {
    t.joint() * cfg.hidden_size * F32
}

/// Gradients alive inside one block's backward beyond its saved set, at its fullest: in a single
/// block, d(linear2 input) and d(linear1 output) in f32 with dO and dY in bf16; in a double
/// block, the MLP's two f32 gradients on the longer stream plus dQ, dK, dV and dO.
pub fn block_backward_transient(cfg: &FluxConfig, t: Tokens, single: bool) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    if single {
        t.joint() * ((c + m) * F32 + (3 * c + m) * F32 + 2 * c * BF16)
    } else {
        2 * t.img.max(t.txt) * m * F32 + 4 * t.joint() * c * BF16
    }
}

/// The residual stream(s) and their gradient between blocks, all f32.
pub fn stream_and_gradient(cfg: &FluxConfig, t: Tokens) -> usize {
    t.joint() * cfg.hidden_size * (F32 + F32)
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
