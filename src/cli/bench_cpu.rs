//! `bench-cpu`: the CPU reference timed in one process on a model, inputs, target and LoRA
//! file: the forward pass with the LoRA applied, the LoRA gradient (forward + backward to the
//! factors), and the training step (gradient + AdamW). One JSON line of medians; the engine's
//! side of tools/cpu_side_by_side.py (docs/perf.md, issue 23).

use super::grad::{open_problem, Problem};
use crate::adapters::formats::UnknownKeys;
use crate::adapters::AdapterSet;
use crate::engine::{Device, Engine, EngineOptions};
use crate::ops::optim::AdamW;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A FLUX transformer (any form `forward --model` takes, except built-in names).
    #[arg(long)]
    pub model: String,
    /// Inputs safetensors, as for `forward --inputs`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// A safetensors with `target` [B,N,C_out], as for `grad --target`.
    #[arg(long)]
    pub target: PathBuf,
    /// The LoRA file applied (forward) and differentiated (gradient, step), at strength 1.
    #[arg(long)]
    pub lora: PathBuf,
    /// Timed repetitions of each case (the median is reported). Default 5.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Untimed repetitions of each case before the timed ones. Default 1.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Worker threads of the CPU path (0: one per core, the default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn main(a: Args) -> Result<()> {
    if a.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(a.threads)
            .build_global()
            .context("--threads: the thread pool was already started")?;
    }
    println!("{}", run(&a)?);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|x, y| x.total_cmp(y));
    v[v.len() / 2]
}

/// Runs `f` warm-up + repeat times; the median seconds of the timed runs.
fn time(a: &Args, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut t = Vec::new();
    for i in 0..a.warmup + a.repeat {
        let t0 = Instant::now();
        f()?;
        if i >= a.warmup {
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(t))
}

pub fn run(a: &Args) -> Result<String> {
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let t_load = Instant::now();
    let Problem { cfg, weights: w, inp, target: tgt, file } =
        open_problem(&a.model, &a.inputs, &a.target, &a.lora, None, UnknownKeys::Error)?;
    let cfg = &cfg;
    let mut set = AdapterSet::new();
    set.add(&file.terms, 1.0);
    let mut engine = Engine::new(&Device::Cpu, cfg, w, EngineOptions::default())?;
    let load_s = t_load.elapsed().as_secs_f64();

    engine.set_adapters(&set)?;
    let forward = time(a, || engine.forward(&inp).map(drop))?;
    engine.train_adapters(&set, None)?;
    let mut loss = f64::NAN;
    let grad = time(a, || {
        engine.zero_grads()?;
        loss = engine.micro_step(&inp, &tgt, None, 1.0, None)?;
        Ok(())
    })?;
    let sizes: Vec<usize> = set.params().map(|p| p.len()).collect();
    let mut opt = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.01);
    let step = time(a, || {
        engine.zero_grads()?;
        engine.micro_step(&inp, &tgt, None, 1.0, None)?;
        engine.optimizer_step(&mut opt, 1e-4, 0.0)?;
        Ok(())
    })?;
    if !loss.is_finite() {
        bail!("the loss is not finite ({loss})");
    }
    let j = serde_json::json!({
        "threads": rayon::current_num_threads(),
        "forward_s": forward,
        "grad_s": grad,
        "step_s": step,
        "loss": loss,
        "load_s": load_s,
        "repeat": a.repeat,
    });
    Ok(j.to_string())
}
