//! 8-bit frozen base weights: int8 with per-output-channel scales and fp8 e4m3 (a plain cast,
//! or with a per-tensor or per-channel scale), the CPU reference of the dequantising matmul, and
//! the weight type the model holds them in. shared/reference/kernel-anchors.md §3 says why these
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
