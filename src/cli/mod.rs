//! Subcommands, one file each; main.rs only parses and dispatches.

pub mod bench_step;
pub mod forward;
pub mod grad;
pub mod info;
pub mod lora_cmd;
pub mod plan;
pub mod quantize;
pub mod sample;
pub mod train;

use crate::adapters::formats::{load_lora, parse_lora_arg, LoraFile, UnknownKeys};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{parse_rope_axes, FluxConfig};
use anyhow::{bail, Result};
use std::path::Path;

/// `--model`: a checkpoint path, or a built-in configuration name for shape-only commands.
pub enum ModelSpec {
    Checkpoint(Box<Checkpoint>),
    Named(String, FluxConfig),
}

impl ModelSpec {
    pub fn cfg(&self) -> &FluxConfig {
        match self {
            ModelSpec::Checkpoint(c) => &c.cfg,
            ModelSpec::Named(_, c) => c,
        }
    }
}

pub fn open_model(spec: &str, rope_axes: Option<&str>) -> Result<ModelSpec> {
    let axes = rope_axes.map(parse_rope_axes).transpose()?;
    let path = Path::new(spec);
    if path.exists() || spec.starts_with(crate::model::checkpoint::RANDOM_PREFIX) {
        return Ok(ModelSpec::Checkpoint(Box::new(Checkpoint::open(path, axes)?)));
    }
    if let Some(mut cfg) = FluxConfig::named(spec) {
        if let Some(a) = axes {
            cfg.rope_axes = a;
            cfg.validate()?;
        }
        return Ok(ModelSpec::Named(spec.to_string(), cfg));
    }
    bail!(
        "--model {spec}: no such file or folder, and not a built-in configuration (flux1-dev, flux1-schnell, tiny; \
         random:NAME[:SEED] for random weights)"
    )
}

/// Loads every `--lora FILE[:SCALE]`, returning each file with its strength.
pub fn open_loras(args: &[String], cfg: &FluxConfig, unknown: UnknownKeys) -> Result<Vec<(LoraFile, f32)>> {
    args.iter()
        .map(|a| {
            let (p, s) = parse_lora_arg(a)?;
            let f = load_lora(&p, cfg, unknown)?;
            for k in &f.skipped {
                eprintln!("warning: {}: skipped LoRA key `{k}` (matches no module of this model)", p.display());
            }
            Ok((f, s))
        })
        .collect()
}

pub fn parse_unknown(s: &str) -> Result<UnknownKeys> {
    match s {
        "error" => Ok(UnknownKeys::Error),
        "warn" => Ok(UnknownKeys::Warn),
        _ => bail!("--lora-unknown takes `error` or `warn`, got `{s}`"),
    }
}

/// `--device`: the device, with a note on stderr when auto falls back to the CPU.
pub fn device(s: &str) -> Result<crate::engine::Device> {
    let (d, note) = crate::engine::Device::parse(s)?;
    if let Some(n) = note {
        eprintln!("--device auto: {n}");
    }
    Ok(d)
}
