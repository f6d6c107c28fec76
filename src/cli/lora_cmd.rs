//! `flux-kernels lora convert` and `lora merge`: exact rewrites between LoRA formats.

use super::open_model;
use crate::adapters::export::{write_lora, LoraFormatOut};
use crate::adapters::formats::{load_lora, parse_lora_arg, UnknownKeys};
use crate::adapters::AdapterSet;
use crate::io::safetensors::Dtype;
use crate::util::thousands;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub fn parse_dtype(s: &str) -> Result<Dtype> {
    match s {
        "f32" | "fp32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::BF16),
        "f16" | "fp16" => Ok(Dtype::F16),
        _ => bail!("--dtype takes f32, bf16 or f16, got `{s}`"),
    }
}

/// Converts one file (at `FILE[:SCALE]`'s strength, folded in) to `format`.
pub fn convert(
    model: &str,
    input: &str,
    out: &Path,
    format: LoraFormatOut,
    dtype: Dtype,
    unknown: UnknownKeys,
) -> Result<String> {
    merge(model, &[input.to_string()], out, format, dtype, unknown)
}

/// Sums several LoRAs with strengths into one file: per module the ranks concatenate, so the
/// result computes exactly Σ strength·ΔW.
pub fn merge(
    model: &str,
    inputs: &[String],
    out: &Path,
    format: LoraFormatOut,
    dtype: Dtype,
    unknown: UnknownKeys,
) -> Result<String> {
    if inputs.is_empty() {
        bail!("give at least one LoRA file");
    }
    let spec = open_model(model, None)?;
    let cfg = spec.cfg();
    let mut set = AdapterSet::new();
    let mut sources = Vec::new();
    for a in inputs {
        let (p, s) = parse_lora_arg(a)?;
        set.add(&load_lora(&p, cfg, unknown)?.terms, s);
        sources.push(format!("{}:{s}", p.display()));
    }
    let meta = BTreeMap::from([("flux_kernels.sources".to_string(), sources.join(", "))]);
    let size = write_lora(out, cfg, set.terms(), format, dtype, meta)?;
    Ok(format!("wrote {} ({} bytes)", out.display(), thousands(size as usize)))
}
