//! `flux-kernels synth-data`: a synthetic cached-sample dataset for a model's widths.

use super::args::RopeArgs;
use super::open_model;
use crate::train::builtin;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint or built-in configuration name whose widths the samples take. Default: the
    /// built-in tiny model.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub rope: RopeArgs,
    /// Output folder of the samples (synthetic-NNN.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// Latent height and width in latent cells (even; 8 pixels each).
    #[arg(long, default_value_t = 16)]
    pub size: usize,
    /// Text tokens per sample.
    #[arg(long, default_value_t = 8)]
    pub n_txt: usize,
    /// Seed of the random latents and text states.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn main(a: Args) -> Result<()> {
    println!("{}", synth_data(a.model.as_deref(), a.rope.rope_axes.as_deref(), &a.out, a.n, a.size, a.n_txt, a.seed)?);
    Ok(())
}

/// Writes a synthetic dataset for a model's widths (or the built-in tiny model's).
pub fn synth_data(
    model: Option<&str>,
    rope_axes: Option<&str>,
    out: &Path,
    n: usize,
    size: usize,
    n_txt: usize,
    seed: u64,
) -> Result<String> {
    let cfg = match model {
        None => builtin::tiny_config(),
        Some(m) => open_model(m, rope_axes)?.cfg().clone(),
    };
    if size == 0 || !size.is_multiple_of(2) {
        bail!("--size must be even");
    }
    let s = builtin::synthetic_samples(&cfg, n, size, n_txt, seed);
    builtin::write_samples(out, &s, cfg.context_in_dim)?;
    Ok(format!("wrote {n} samples to {}", out.display()))
}
