//! What one training step keeps on the GPU between the forward and the backward, per block, as
//! the device-resident step (src/engine/cuda/) allocates it, in the op order of
//! docs/flux-model.md §2.7–2.8. Its policy: the residual streams and the statistics (1/std,
//! log-sum-exp, the QK RMSNorms' 1/rms) are f32; every tensor a linear reads or writes inside a
//! block is kept as the bf16 it was rounded to when produced, and the linears' inputs that can be
//! rebuilt bit for bit from other saved tensors are not kept (the modulated LayerNorm output from
//! n and the modulation vectors, GELU's output from its input, the merged attention output from
//! O); attention is flash attention (Q, K, V, O in bf16); the LoRA terms' x·Aᵀ is recomputed in
//! the backward. (The CPU reference keeps more, in f32.) tests/gpu_flux_step.rs holds these
//! counts to the bytes the step allocates per block under the CUDA emulation; where they
//! disagree, the code is right and this is a bug.

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

/// Flash attention over `l` tokens: O in bf16 and the f32 log-sum-exp per (head, row). Q, K, V
/// and the QK RMSNorms' 1/rms are rebuilt from the saved qkv in the backward.
pub fn attention_saved(cfg: &FluxConfig, l: usize) -> usize {
    l * cfg.hidden_size * BF16 + l * cfg.num_heads * F32
}

/// One stream of a double block over `n` tokens, attention excluded (`blocks::StreamAct`).
fn stream_saved(cfg: &FluxConfig, n: usize) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    6 * c * F32               // the six modulation vectors
        + n * c * BF16        // LN1: normalised rows (its modulated output, the qkv input, is rebuilt)
        + 3 * n * c * BF16    // qkv output: the QK prologue's input, read again by its backward
        + n * c * BF16        // proj output: the gate's gradient (its input is re-merged from O)
        + n * c * BF16        // LN2: normalised rows
        + n * m * BF16        // MLP pre-activation: GELU's input, forward and backward
        + n * c * BF16        // MLP output: the second gate's gradient
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
        + l * c * BF16            // pre-norm: normalised rows
        + l * (3 * c + m) * BF16  // linear1 output: the QK prologue's and GELU's input
        + l * c * BF16            // linear2 output: the gate's gradient (its input is rebuilt)
        + l * F32                 // 1/std of the pre-norm
        + attention_saved(cfg, l)
}

/// A block's input: what per-block checkpointing keeps instead of the saved set (f32, so the
/// recomputed forward is the same bits).
pub fn block_input(cfg: &FluxConfig, t: Tokens) -> usize {
    t.joint() * cfg.hidden_size * F32
}

/// Gradients and rebuilt inputs alive inside one block's backward beyond its saved set, at its
/// fullest. Single block: d(linear2 input) in f32 (the GEMM's dX) with d(linear1 output) and dO
/// in bf16.
/// Double block, the larger of: the MLP backward on the longer stream (GELU's output rebuilt in
/// bf16, its f32 gradient, d(MLP output) in bf16) and the QK/qkv backward (the rebuilt Q, K, V
/// and 1/rms and dQ, dK, dV over the joint sequence with, on the longer stream, d qkv in bf16
/// and the qkv linear's dX and rebuilt input).
pub fn block_backward_transient(cfg: &FluxConfig, t: Tokens, single: bool) -> usize {
    let (c, m) = (cfg.hidden_size, cfg.mlp_hidden);
    if single {
        t.joint() * ((c + m) * F32 + (3 * c + m) * BF16 + c * BF16)
    } else {
        let n = t.img.max(t.txt);
        let mlp = n * (m * BF16 + m * F32 + c * BF16);
        let heads = t.joint() * (6 * c * BF16 + 2 * cfg.num_heads * F32);
        let qkv = heads + n * (3 * c * BF16 + c * F32 + c * BF16);
        mlp.max(qkv)
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
