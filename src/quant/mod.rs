//! 8-bit frozen base weights: int8 with per-output-channel scales and fp8 e4m3 (a plain cast,
//! or with a per-tensor or per-channel scale), the CPU reference of the dequantising matmul, and
//! the weight type the model holds them in. docs/kernel-notes.md §3 says why these
//! schemes and why the scale goes where it does.

pub mod fp8;
pub mod load;
pub mod matmul;
pub mod scheme;
pub mod stored;

pub use matmul::{qlinear_backward_input, qlinear_forward, QRows, QWeight};
pub use scheme::{quantize, quantize_tensor, Code, Granularity, Scale, Scheme};
pub use stored::{Codes, QPiece, QuantParam};

/// Safetensors metadata key naming the scheme of a quantised checkpoint.
pub const METADATA_KEY: &str = "flux_kernels.quantization";

/// Whether `quantize` stores a tensor (stored key in either layout, bundle prefix allowed) in 8
/// bits: the 2-D weights of the linears inside the double and single blocks, modulation linears
/// included (99.5 % of FLUX.1-dev's parameters). Biases, QK-norm scales, the embedders and the
/// final layer stay as stored, as ai-toolkit quantises only the blocks: the first and last
/// layers touch every token's input and output directly and would save only 0.5 % of the bytes.
pub fn quantised_by_default(key: &str, shape: &[usize]) -> bool {
    let k = key.strip_prefix(crate::io::BFL_BUNDLE_PREFIX).unwrap_or(key);
    let in_block = ["double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."]
        .iter()
        .any(|p| k.starts_with(p));
    in_block && k.ends_with(".weight") && shape.len() == 2
}
