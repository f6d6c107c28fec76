//! The text encoders FLUX conditions on: T5-XXL v1.1 (per-token states, `txt`) and CLIP-L
//! (the pooled vector, `y`), with their tokenizers. CPU reference in f32.

pub mod clip;
pub mod t5;
