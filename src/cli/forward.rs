//! `flux-kernels forward`: one forward pass, `out` [B, N, C] in f32: the CPU reference, or with
//! `--device cuda` the device-resident GPU model.

use super::args::ModelArgs;
use super::{open_loras, open_model, parse_unknown, ModelSpec};
use crate::adapters::formats::UnknownKeys;
use crate::adapters::AdapterSet;
use crate::engine::{Engine, EngineOptions};
use crate::io::safetensors::{write_tensors, Dtype, OutTensor};
use crate::model::flux::FluxInputs;
use crate::model::weights::FluxWeights;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Inputs (safetensors, any float dtype): img [B,N,C_in] packed latents, img_ids [N,3] or
    /// [B,N,3], txt [B,L,D_ctx] T5 states, txt_ids [L,3] or [B,L,3], y [B,D_vec] CLIP pooled,
    /// timesteps [B] (sigma in [0,1]), guidance [B] (the scale itself, e.g. 3.5; required
    /// when the model has a guidance embedding).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output safetensors file; written atomically (temp file, then rename).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn main(a: Args) -> Result<()> {
    let m = &a.m;
    let unknown = parse_unknown(&m.lora_unknown)?;
    run(&m.model, &a.inputs, &a.out, &m.lora, m.rope.rope_axes.as_deref(), unknown, &m.device)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

pub fn run(
    model: &str,
    inputs: &Path,
    out: &Path,
    loras: &[String],
    rope_axes: Option<&str>,
    unknown: UnknownKeys,
    device: &str,
) -> Result<()> {
    let spec = open_model(model, rope_axes)?;
    let ModelSpec::Checkpoint(ckpt) = spec else {
        bail!("--model {model} is a built-in configuration without weights; forward needs a checkpoint");
    };
    let cfg = &ckpt.cfg;
    let weights = FluxWeights::new(cfg, &|n| ckpt.param(n).cloned())?;
    let inp = FluxInputs::from_file(inputs, cfg)?;
    let mut set = AdapterSet::new();
    for (f, strength) in open_loras(loras, cfg, unknown)? {
        set.add(&f.terms, strength);
    }
    let mut engine = Engine::new(&super::device(device)?, cfg, weights, EngineOptions::default())?;
    engine.set_adapters(&set)?;
    let y = engine.forward(&inp)?;
    if let Some(i) = y.iter().position(|v| !v.is_finite()) {
        bail!("the forward pass produced a non-finite value at flat index {i}; nothing written");
    }
    let shape = vec![inp.b, inp.n_img, cfg.out_channels];
    write_tensors(out, &[OutTensor { name: "out", shape, data: &y, dtype: Dtype::F32 }], &BTreeMap::new())
}
