//! `flux-kernels lora convert` and `lora merge`: exact rewrites between LoRA formats.

use super::{open_model, parse_unknown, ModelSpec};
use crate::adapters::dora::frozen_row_norms;
use crate::adapters::export::{write_lora, LoraFormatOut};
use crate::adapters::formats::{load_lora, parse_lora_arg, UnknownKeys};
use crate::adapters::AdapterSet;
use crate::io::safetensors::{Dtype, SafeTensors};
use crate::util::thousands;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: LoraCmd,
}

#[derive(clap::Subcommand)]
pub enum LoraCmd {
    /// Rewrite a LoRA file in another format (exact): peft (diffusers) or kohya (LyCORIS LoKr/LoHa
    /// keep LyCORIS's keys).
    Convert {
        #[command(flatten)]
        w: WriteArgs,
        /// Input LoRA file, any supported dialect; FILE:SCALE folds a strength in (default 1).
        #[arg(long = "in", value_name = "FILE[:SCALE]")]
        input: String,
    },
    /// Sum several LoRAs with strengths into one file, exactly (ranks concatenate per module).
    Merge {
        #[command(flatten)]
        w: WriteArgs,
        /// LoRA files with optional strengths (default 1): a.safetensors:0.8 b.safetensors:-0.5
        #[arg(required = true, value_name = "FILE[:SCALE]")]
        inputs: Vec<String>,
    },
}

/// Where and how `lora convert` / `lora merge` write.
#[derive(clap::Args)]
pub struct WriteArgs {
    /// Model or built-in configuration the LoRA belongs to (for module shapes).
    #[arg(long)]
    pub model: String,
    /// Output LoRA file (.safetensors), written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// peft (diffusers) or kohya; LyCORIS LoKr and LoHa terms are written with LyCORIS's keys in
    /// the kohya dialect (`lycoris` is the same), and peft refuses them.
    #[arg(long, value_name = "peft|kohya", default_value = "peft")]
    pub format: String,
    /// Storage dtype of the factors: f32, bf16, f16, or source (the first input's, so a
    /// conversion does not grow the file).
    #[arg(long, value_name = "source|f32|bf16|f16", default_value = "source")]
    pub dtype: String,
    /// What to do with a LoRA key that matches no module of the model: `error` or `warn` (skip it
    /// with a warning).
    #[arg(long, value_name = "error|warn", default_value = "error")]
    pub lora_unknown: String,
}

pub fn main(a: Args) -> Result<()> {
    // A conversion is a merge of one file.
    let (w, inputs) = match a.cmd {
        LoraCmd::Convert { w, input } => (w, vec![input]),
        LoraCmd::Merge { w, inputs } => (w, inputs),
    };
    let (format, dtype, unknown) = (w.format.parse()?, parse_dtype(&w.dtype)?, parse_unknown(&w.lora_unknown)?);
    println!("{}", merge(&w.model, &inputs, &w.out, format, dtype, unknown)?);
    Ok(())
}

/// `--dtype`: None for `source`.
pub fn parse_dtype(s: &str) -> Result<Option<Dtype>> {
    match s {
        "source" => Ok(None),
        "f32" | "fp32" => Ok(Some(Dtype::F32)),
        "bf16" => Ok(Some(Dtype::BF16)),
        "f16" | "fp16" => Ok(Some(Dtype::F16)),
        _ => bail!("--dtype takes source, f32, bf16 or f16, got `{s}`"),
    }
}

/// The dtype most of a file's tensor bytes are stored in, among those a LoRA is written in
/// (f32 when it holds none: an fp8 or integer source is not written back as such).
fn stored_dtype(path: &Path) -> Result<Dtype> {
    let st = SafeTensors::open(path)?;
    let mut by: BTreeMap<&str, (usize, Dtype)> = BTreeMap::new();
    for i in st.tensors().values().filter(|i| matches!(i.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16)) {
        let e = by.entry(i.dtype.name()).or_insert((0, i.dtype));
        e.0 += i.numel();
    }
    Ok(by.into_values().max_by_key(|(n, _)| *n).map_or(Dtype::F32, |(_, d)| d))
}

/// Converts one file (at `FILE[:SCALE]`'s strength, folded in) to `format`.
pub fn convert(
    model: &str,
    input: &str,
    out: &Path,
    format: LoraFormatOut,
    dtype: Option<Dtype>,
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
    dtype: Option<Dtype>,
    unknown: UnknownKeys,
) -> Result<String> {
    if inputs.is_empty() {
        bail!("give at least one LoRA file");
    }
    let spec = open_model(model, None)?;
    let cfg = spec.cfg();
    let mut set = AdapterSet::new();
    let mut sources = Vec::new();
    let dtype = match dtype {
        Some(d) => d,
        None => stored_dtype(&parse_lora_arg(&inputs[0])?.0)?,
    };
    for a in inputs {
        let (p, s) = parse_lora_arg(a)?;
        set.add(&load_lora(&p, cfg, unknown)?.terms, s);
        sources.push(format!("{}:{s}", p.display()));
    }
    let meta = BTreeMap::from([("flux_kernels.sources".to_string(), sources.join(", "))]);
    // A kohya DoRA module covered in part needs the frozen row norms: a model file has them.
    let norms = |module: &str| -> Result<Vec<f32>> {
        let ModelSpec::Checkpoint(ckpt) = &spec else {
            bail!(
                "`{module}`: its DoRA terms cover part of its rows, and kohya's dora_scale needs every row's frozen \
                 norm, but --model {model} is a configuration name: give the model file, or write --format peft"
            );
        };
        let d_in = set.terms().iter().find(|t| t.module == module).map_or(1, |t| t.d_in);
        let w = ckpt.param(&format!("{module}.weight"))?.load()?;
        Ok(frozen_row_norms(&w, d_in))
    };
    let size = write_lora(out, cfg, set.terms(), format, dtype, meta, Some(&norms))?;
    Ok(format!("wrote {} ({} bytes, {} factors)", out.display(), thousands(size as usize), dtype.name()))
}
