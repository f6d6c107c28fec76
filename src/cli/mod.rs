//! Subcommands, one file each: its clap `Args` and a `main(Args)` that prints its output. The
//! command tree ([`Cli`]) is here so that tests can walk it; main.rs parses and dispatches.
//! Shared argument groups and the flag conventions are in `args`.

pub mod args;
pub mod bench_cpu;
pub mod bench_step;
pub mod cache;
pub mod forward;
pub mod grad;
pub mod info;
pub mod lora_cmd;
pub mod plan;
pub mod quantize;
pub mod sample;
pub mod serve;
pub mod synth_data;
pub mod train;

use crate::adapters::formats::{load_lora, parse_lora_arg, LoraFile, UnknownKeys};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{parse_rope_axes, FluxConfig};
use anyhow::{bail, Result};
use std::path::Path;

/// LoRA fine-tuning and sampling of FLUX.1-dev: a CPU reference and CUDA kernels.
#[derive(clap::Parser)]
#[command(name = "flux-kernels", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Print the architecture, parameter counts, dtype and size of a model, and what each LoRA holds.
    Info(info::Args),
    /// Train a LoRA (flow matching, AdamW) on images with captions or cached samples; with no
    /// --model and no --data, the built-in demo: a tiny FLUX and a synthetic set, about 10 s on a
    /// 2-core CPU.
    Train(Box<train::Args>),
    /// Sample latents (and PNG previews) with the FLUX.1-dev Euler schedule, any number of LoRA
    /// sets switched without reloading the base. Without --model: the built-in tiny model.
    Sample(Box<sample::Args>),
    /// Serve images over HTTP: the AUTOMATIC1111/Forge txt2img API subset (LoRAs as
    /// `<lora:NAME:WEIGHT>` in the prompt, from --lora-dir) and a web page at `/`; requests
    /// with different LoRAs share one transformer pass.
    Serve(Box<serve::Args>),
    /// Encode a folder of images + same-name .txt captions into the trainer's cached samples
    /// (VAE latents, T5 states, CLIP pooled), skipping those already cached and unchanged.
    Cache(cache::Args),
    /// Write a synthetic cached-sample dataset for a model's widths (try the trainer without data).
    SynthData(synth_data::Args),
    /// Convert or merge LoRA files.
    Lora(lora_cmd::Args),
    /// Run one forward pass of the CPU reference and write `out` [B, N, C] (f32).
    Forward(forward::Args),
    /// Quantise a transformer's block linears to 8 bits (int8 per-channel or fp8 e4m3), streamed
    /// tensor by tensor; forward, train and sample load the result through --model.
    Quantize(quantize::Args),
    /// Time full LoRA training steps of the device-resident GPU model on synthetic inputs (one
    /// JSON line: median step time, peak device memory, the planner's prediction).
    BenchStep(bench_step::Args),
    /// Time the CPU reference on a model, inputs, target and LoRA in one process (one JSON line:
    /// median forward, LoRA gradient and training-step times); the engine's side of
    /// tools/cpu_side_by_side.py.
    BenchCpu(bench_cpu::Args),
    /// Predict the peak GPU memory of a LoRA training step (weights by dtype, LoRA and AdamW
    /// state, activations, workspace), whether it fits, and which settings would.
    Plan(plan::Args),
    /// Gradient of mean((out − target)²), averaged over all elements, with respect to every
    /// factor of one LoRA file at strength 1, written under the file's own tensor names (f32), the
    /// loss in the file's metadata.
    Grad(grad::Args),
}

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

/// Prints a command's log lines: `warning:` and `note:` lines to stderr, the rest to stdout.
pub fn print_log(lines: &[String]) {
    for l in lines {
        if l.starts_with("warning:") || l.starts_with("note:") {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    }
}
