//! Files and formats, with no model types: safetensors (memory-mapped reading, validation,
//! atomic writing, sharded indexes), images (decoding, bucketing, PNG writing) and JSON configs
//! read into the serde structs of the layers above. What the tensors of a file mean
//! is the business of the layers above (`model::checkpoint`, `adapters::formats`).

pub mod images;
pub mod safetensors;

use anyhow::{Context, Result};
use std::path::Path;

/// Reads a JSON file (a config.json, an index, a tokenizer config) into `T`, a serde derive of
/// the fields its reader uses; the error names the file, and serde's says which field and where.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON or not the expected fields", path.display()))
}

/// Key prefix of single-file bundles of the BFL transformer (ComfyUI's "checkpoint" files).
pub const BFL_BUNDLE_PREFIX: &str = "model.diffusion_model.";
