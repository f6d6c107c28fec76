//! `flux-kernels train`: settings from `--config FILE` (TOML, the same key names), each
//! overridden by its flag; with no model and no data, the built-in demo.

use crate::train::config::TrainConfig;
use crate::train::trainer::{train, Outcome};
use anyhow::Result;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Every key of the TOML config is also a flag; the flag wins.
#[derive(clap::Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any of the keys below (snake_case, e.g. `batch_size = 4`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Resume from a checkpoint folder (its config is the base; flags and --config still apply).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Base model (BFL file, diffusers folder, FLUX.1 repository, or random:flux1-dev[:SEED] for
    /// random weights). Omit with --data for the demo.
    #[arg(long)]
    pub model: Option<String>,
    /// Folder of cached samples: .safetensors with latent [16,h,w], txt [L,4096], y [768].
    #[arg(long)]
    pub data: Option<String>,
    /// Prior preservation: folder of class samples (same format).
    #[arg(long)]
    pub class_data: Option<String>,
    /// Weight λ of the class (prior) loss. Default 1.
    #[arg(long)]
    pub prior_weight: Option<f32>,
    /// Output LoRA file. Default lora.safetensors (demo: demo/lora.safetensors).
    #[arg(long)]
    pub out: Option<String>,
    /// peft (diffusers, default) or kohya.
    #[arg(long)]
    pub format: Option<String>,
    /// Storage of the written LoRA: bf16 (default), f16, f32.
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// LoRA rank. Default 16.
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha (scale alpha/rank). Default: the rank.
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Targets: attn, attn-mlp (default; demo: all with modulation), all; diffusers or BFL names; globs.
    #[arg(long)]
    pub targets: Option<String>,
    /// With `all`: also the modulation linears.
    #[arg(long)]
    pub include_modulation: Option<bool>,
    /// Per-module ranks: to_q=8,proj_mlp=32
    #[arg(long)]
    pub rank_pattern: Option<String>,
    /// Per-module alphas: to_q=8
    #[arg(long)]
    pub alpha_pattern: Option<String>,
    /// rsLoRA scaling alpha/√rank.
    #[arg(long)]
    pub rslora: Option<bool>,
    /// LoRA dropout on the adapter input. Default 0.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// A initialisation: kaiming (PEFT default) or gaussian.
    #[arg(long)]
    pub init: Option<String>,
    /// Optimizer steps. Default 1000 (demo 600).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Learning rate. Default 1e-4 (demo 5e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Samples per micro-batch (one size per batch). Default 1 (demo 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step. Default 1.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Seed of initialisation, data order, noise, σ and dropout. Default 42.
    #[arg(long)]
    pub seed: Option<u64>,
    /// constant (default; demo cosine) or cosine, after the warm-up.
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Linear warm-up steps. Default 0.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    #[arg(long)]
    pub adam_eps: Option<f64>,
    /// AdamW decoupled weight decay. Default 0.01.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0: off). Default 1.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// σ sampling: uniform, logit_normal, sigmoid (default), flux_shift, shift.
    #[arg(long)]
    pub timestep_sampling: Option<String>,
    #[arg(long)]
    pub logit_mean: Option<f64>,
    #[arg(long)]
    pub logit_std: Option<f64>,
    #[arg(long)]
    pub sigmoid_scale: Option<f64>,
    /// Fixed shift for `shift` sampling. Default 3.
    #[arg(long)]
    pub shift: Option<f64>,
    /// none (default), sigma_sqrt, cosmap.
    #[arg(long)]
    pub loss_weighting: Option<String>,
    /// Guidance fed to the guidance embedding while training. Default 1.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Probability of zeroing a sample's text states. Default 0.
    #[arg(long)]
    pub caption_dropout: Option<f32>,
    /// Checkpoint every N steps (0: only on Ctrl-C).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Checkpoint folder. Default <out>.ckpt
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// JSON-lines metrics file (step, loss, lr, grad_norm, prior_loss).
    #[arg(long)]
    pub metrics: Option<String>,
    /// RoPE axes when the model's head dim is not 128.
    #[arg(long)]
    pub rope_axes: Option<String>,
    /// A log line every N steps (0: about 20 per run).
    #[arg(long)]
    pub log_every: Option<usize>,
    /// VAE (diffusers folder or ae.safetensors); default: the model folder's vae/ or ae.safetensors.
    #[arg(long)]
    pub vae: Option<String>,
    /// T5 encoder (HF folder or t5xxl_*.safetensors); default: the model folder's text_encoder_2/.
    #[arg(long)]
    pub t5: Option<String>,
    /// T5 tokenizer (tokenizer.json, spiece.model or a folder); default: tokenizer_2/.
    #[arg(long)]
    pub t5_tokenizer: Option<String>,
    /// CLIP text model (HF folder or clip_l.safetensors); default: text_encoder/.
    #[arg(long)]
    pub clip: Option<String>,
    /// CLIP tokenizer (tokenizer.json, vocab.json + merges.txt, or a folder); default: tokenizer/.
    #[arg(long)]
    pub clip_tokenizer: Option<String>,
    /// Image datasets: bucket target sides, comma-separated. Default 512.
    #[arg(long)]
    pub resolution: Option<String>,
    /// Bucket sides are multiples of this. Default 64.
    #[arg(long)]
    pub bucket_step: Option<usize>,
    /// Also train on horizontal flips of the images.
    #[arg(long)]
    pub flip: Option<bool>,
    /// T5 length: 512 (default) or 256.
    #[arg(long)]
    pub t5_max_len: Option<usize>,
    /// Encode a VAE sample instead of the mean.
    #[arg(long)]
    pub vae_sample: Option<bool>,
    /// Where image datasets are cached. Default <data>/.flux-cache
    #[arg(long)]
    pub cache_dir: Option<String>,
    /// A prompt sampled every --sample-every steps; repeat for several.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Option<Vec<String>>,
    #[arg(long)]
    pub sample_every: Option<usize>,
    #[arg(long)]
    pub sample_steps: Option<usize>,
    #[arg(long)]
    pub sample_guidance: Option<f32>,
    #[arg(long)]
    pub sample_seed: Option<u64>,
    /// Sample side in pixels (default: the first resolution side).
    #[arg(long)]
    pub sample_size: Option<usize>,
    /// cpu, cuda or auto (default): where the transformer runs (CUDA: the whole step on the GPU).
    #[arg(long)]
    pub device: Option<String>,
    /// GPU base weights: bf16 (default; 8-bit files keep their codes) or int8 (quantised at load).
    #[arg(long)]
    pub base: Option<String>,
    /// GPU: recompute each block's activations in the backward instead of keeping them.
    #[arg(long)]
    pub gradient_checkpointing: Option<bool>,
}

macro_rules! apply {
    ($cfg:ident, $args:ident, $($f:ident),*) => {
        $( if let Some(v) = $args.$f.clone() { $cfg.$f = v; } )*
    };
}

impl TrainArgs {
    /// The config: checkpoint's (when resuming) or defaults, then --config, then the flags.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut c = match &self.resume {
            Some(dir) => crate::train::checkpoint::load(dir)?.config,
            None => TrainConfig::default(),
        };
        if let Some(p) = &self.config {
            let file = TrainConfig::from_toml(p)?;
            // Keys present in the file override; parse it again as a table to know which.
            let table: toml::Table = toml::from_str(&std::fs::read_to_string(p)?)?;
            let mut merged = serde_json::to_value(&c)?;
            let fv = serde_json::to_value(&file)?;
            for k in table.keys() {
                merged[k] = fv[k].clone();
            }
            c = serde_json::from_value(merged)?;
        }
        let a = self;
        apply!(
            c,
            a,
            model,
            data,
            class_data,
            prior_weight,
            out,
            format,
            save_dtype,
            rank,
            alpha,
            targets,
            include_modulation,
            rank_pattern,
            alpha_pattern,
            rslora,
            dropout,
            init,
            steps,
            lr,
            batch_size,
            grad_accum,
            seed,
            lr_schedule,
            warmup_steps,
            adam_beta1,
            adam_beta2,
            adam_eps,
            weight_decay,
            max_grad_norm,
            timestep_sampling,
            logit_mean,
            logit_std,
            sigmoid_scale,
            shift,
            loss_weighting,
            guidance,
            caption_dropout,
            checkpoint_every,
            checkpoint_dir,
            metrics,
            rope_axes,
            log_every,
            vae,
            t5,
            t5_tokenizer,
            clip,
            clip_tokenizer,
            resolution,
            bucket_step,
            flip,
            t5_max_len,
            vae_sample,
            cache_dir,
            sample_prompts,
            sample_every,
            sample_steps,
            sample_guidance,
            sample_seed,
            sample_size,
            device,
            base,
            gradient_checkpointing
        );
        if c.model.is_empty() && c.data.is_empty() && self.resume.is_none() {
            c = c.builtin_demo();
        }
        Ok(c)
    }
}

pub fn run(args: &TrainArgs) -> Result<Outcome> {
    let tc = args.resolve()?;
    super::plan::check_before_training(&tc)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // Ctrl-C: finish the current step, save a checkpoint, write the LoRA, exit cleanly.
    let _ = ctrlc::set_handler(move || s.store(true, std::sync::atomic::Ordering::SeqCst));
    train(tc, args.resume.as_deref(), stop, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        a: TrainArgs,
    }

    /// Every config key has a flag that reaches the config: set each through its flag and
    /// compare with the defaults, key by key.
    #[test]
    fn every_flag_reaches_its_key() {
        let d = serde_json::to_value(TrainConfig::default()).unwrap();
        let keys: Vec<String> = d.as_object().unwrap().keys().cloned().collect();
        for k in keys {
            let flag = if k == "sample_prompts" {
                "--sample-prompt".to_string()
            } else {
                format!("--{}", k.replace('_', "-"))
            };
            let v = match &d[&k] {
                serde_json::Value::Bool(_) => "true".to_string(),
                serde_json::Value::Number(n) if n.is_u64() => "7".to_string(),
                serde_json::Value::Number(_) => "0.25".to_string(),
                _ => "x".to_string(),
            };
            // A model keeps resolve() from switching to the demo's defaults.
            let mut argv = vec!["t".to_string(), flag.clone(), v];
            if k != "model" {
                argv.extend(["--model".to_string(), "m".to_string()]);
            }
            let w = Wrap::try_parse_from(argv).unwrap_or_else(|e| panic!("{flag}: {e}"));
            let c = serde_json::to_value(w.a.resolve().unwrap()).unwrap();
            assert_ne!(c[&k], d[&k], "flag {flag} did not reach `{k}`");
        }
    }
}
