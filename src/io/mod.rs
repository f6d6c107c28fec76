//! Files and formats, with no model types: safetensors (memory-mapped reading, validation,
//! atomic writing) and images (decoding, bucketing, PNG writing). What the tensors of a file mean
//! is the business of the layers above (`model::checkpoint`, `adapters::formats`).

pub mod images;
pub mod safetensors;

/// Key prefix of single-file bundles of the BFL transformer (ComfyUI's "checkpoint" files).
pub const BFL_BUNDLE_PREFIX: &str = "model.diffusion_model.";
