//! `flux-kernels train`: settings from `--config FILE` (TOML, the same key names), each
//! overridden by its flag; with no model and no data, the built-in demo.

use super::args::{switch, AdapterArgs, NsfwArgs};
use crate::dist::RankEnv;
use crate::train::config::TrainConfig;
use crate::train::trainer::{train_ranked, Outcome};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Every key of the TOML config is also a flag; the flag wins. A boolean key is a switch pair,
/// `--flip` / `--no-flip`: either overrides the file, neither leaves it.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Args {
    /// TOML file with any of the keys below (snake_case, e.g. `batch_size = 4`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Resume from a checkpoint folder (its config is the base; flags and --config still apply).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Base model (BFL file, diffusers folder, FLUX.1 repository, or random:flux1-dev[:SEED] for
    /// random weights). Omit both --model and --data for the built-in demo.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: a folder of images with same-name .txt captions (encoded and cached first),
    /// a folder of cached samples (.safetensors with latent [16,h,w], txt [L,4096], y [768]), or
    /// `builtin` for the built-in synthetic set. Required with --model.
    #[arg(long)]
    pub data: Option<String>,
    /// Prior preservation: folder of class samples (same format).
    #[arg(long)]
    pub class_data: Option<String>,
    /// Weight λ of the class (prior) loss. Default 1.
    #[arg(long)]
    pub prior_weight: Option<f32>,
    /// Output LoRA file. Default lora.safetensors (demo: demo/lora.safetensors). While the run
    /// lasts, <out>.lock beside it keeps a second run off the same output.
    #[arg(long)]
    pub out: Option<String>,
    /// peft (diffusers, default) or kohya.
    #[arg(long)]
    pub format: Option<String>,
    /// Storage of the written LoRA: bf16 (default), f16, f32.
    #[arg(long)]
    pub save_dtype: Option<String>,
    /// Rank, alpha, targets and learning rate for a kind of LoRA: style (rank 16, lr 4e-4),
    /// character (rank 32, lr 2e-4) or concept (rank 64, all block linears, lr 1e-4). Any of those
    /// given as a flag or in --config wins; the run prints what it chose.
    #[arg(long, value_name = "style|character|concept")]
    pub preset: Option<String>,
    /// LoRA rank, alpha, targets and their patterns (as for `info` and `plan`).
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// LoRA dropout on the adapter input. Default 0.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// A initialisation: kaiming (PEFT default) or gaussian.
    #[arg(long)]
    pub init: Option<String>,
    /// Adapter kind: lora (default) or dora (PEFT's use_dora: each adapted linear's rows are
    /// rescaled to a trained magnitude; CPU or CUDA, written with lora_magnitude_vector, or
    /// dora_scale with --format kohya).
    /// (TOML key `adapter`.)
    /// lokr: LyCORIS's LoKr (w1 ⊗ w2, w1 whole, w2 low rank of --rank or whole; CPU path, written
    /// with LyCORIS keys, so --format kohya, which --adapter lokr picks when --format is not given).
    #[arg(long = "adapter", value_name = "lora|dora|lokr")]
    pub adapter_kind: Option<String>,
    /// LoKr's factor (LyCORIS's `factor`): each dimension is split into the divisor nearest it (w1)
    /// times the rest (w2); -1, the default, splits as evenly as possible. (TOML key `lokr_factor`.)
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    pub lokr_factor: Option<i64>,
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
    /// Run each micro-batch as N slices one after another, gradients added in order (less
    /// activation memory; the arithmetic of N data-parallel ranks). Default 1.
    #[arg(long, value_name = "N")]
    pub batch_slices: Option<usize>,
    /// Data parallelism: add the ranks' gradients in rank order (all-gather, then a sum) rather
    /// than NCCL's all-reduce, so N ranks equal one with --batch-slices N bit for bit (checked on the
    /// CPU path and under the CUDA emulation; on GPUs: the same bits run to run).
    #[arg(long, overrides_with = "no_deterministic_reduce")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub deterministic_reduce: Option<bool>,
    /// Turn --deterministic-reduce off.
    #[arg(long, overrides_with = "deterministic_reduce")]
    pub no_deterministic_reduce: bool,
    /// Data-parallel training on N GPUs of this machine: the program starts itself once per GPU
    /// (ranks 0..N-1, NCCL between them); each micro-batch is N × --batch-size samples. Several
    /// machines: start it on each with torchrun's variables instead (RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT; README, docs/multi-gpu.md). Default 1.
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
    /// Seed of initialisation, data order, noise, σ and dropout. Default 42.
    #[arg(long)]
    pub seed: Option<u64>,
    /// constant (default; demo cosine) or cosine, after the warm-up.
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// Linear warm-up steps. Default 0.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// AdamW β1, the first moment's decay. Default 0.9.
    #[arg(long)]
    pub adam_beta1: Option<f64>,
    /// AdamW β2, the second moment's decay. Default 0.999.
    #[arg(long)]
    pub adam_beta2: Option<f64>,
    /// AdamW ε added to the root of the second moment. Default 1e-8.
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
    /// Mean of the normal draw of `logit_normal` sampling (σ = sigmoid(mean + std·N)). Default 0.
    #[arg(long)]
    pub logit_mean: Option<f64>,
    /// Standard deviation of the normal draw of `logit_normal` sampling. Default 1.
    #[arg(long)]
    pub logit_std: Option<f64>,
    /// Scale s of sigmoid, flux_shift and shift sampling (σ = sigmoid(s·N) before any shift). Default 1.
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
    /// JSON-lines metrics file (step, loss, lr, grad_norm, prior_loss); lines of steps after the
    /// run's first (after the resumed step, or all for a new run) are dropped first.
    #[arg(long)]
    pub metrics: Option<String>,
    /// RoPE split of the head dim (FLUX.1: 16,56,56); needed only when the head dim is not 128
    /// and the checkpoint has no config.json saying it.
    #[arg(long, value_name = "A,B,C")]
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
    /// Image datasets: bucket target sides in pixels, comma-separated. Default 512.
    #[arg(long)]
    pub resolution: Option<String>,
    /// Bucket sides are multiples of this many pixels. Default 64.
    #[arg(long)]
    pub bucket_step: Option<usize>,
    /// Also train on horizontal flips of the images. Default off.
    #[arg(long, overrides_with = "no_flip")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub flip: Option<bool>,
    /// Turn --flip off.
    #[arg(long, overrides_with = "flip")]
    pub no_flip: bool,
    /// T5 length in tokens: 512 (default) or 256.
    #[arg(long)]
    pub t5_max_len: Option<usize>,
    /// Encode a VAE sample instead of the mean. Default off.
    #[arg(long, overrides_with = "no_vae_sample")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub vae_sample: Option<bool>,
    /// Turn --vae-sample off.
    #[arg(long, overrides_with = "vae_sample")]
    pub no_vae_sample: bool,
    /// Where image datasets are cached. Default <data>/.flux-cache
    #[arg(long)]
    pub cache_dir: Option<String>,
    /// A prompt sampled every --sample-every steps (PNGs in <out>-samples/); repeat for several.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Option<Vec<String>>,
    /// Sample the --sample-prompt prompts every N optimizer steps. Default 0 (never).
    #[arg(long)]
    pub sample_every: Option<usize>,
    /// Euler steps of each preview sample. Default 20.
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Guidance of the preview samples. Default 3.5.
    #[arg(long)]
    pub sample_guidance: Option<f32>,
    /// Seed of the preview samples' noise. Default 0.
    #[arg(long)]
    pub sample_seed: Option<u64>,
    /// Sample side in pixels (default: the first resolution side).
    #[arg(long)]
    pub sample_size: Option<usize>,
    /// The NSFW check on the preview images, as `sample` runs it.
    #[command(flatten)]
    pub nsfw: NsfwArgs,
    /// cpu, cuda or auto (default): where the transformer runs (CUDA: the whole step on the GPU).
    #[arg(long)]
    pub device: Option<String>,
    /// GPU base weights: bf16 (default; 8-bit files keep their codes) or int8 (quantised at load).
    #[arg(long)]
    pub base: Option<String>,
    /// GPU: recompute each block's activations in the backward instead of keeping them. Default off.
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    #[arg(num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", hide_possible_values = true)]
    pub gradient_checkpointing: Option<bool>,
    /// Turn --gradient-checkpointing off.
    #[arg(long, overrides_with = "gradient_checkpointing")]
    pub no_gradient_checkpointing: bool,
    /// GPU: keep the last N blocks' frozen weights in pinned host memory, streamed in per block
    /// on a second stream (block swap, for small cards). Default 0.
    #[arg(long)]
    pub blocks_to_swap: Option<usize>,
    /// GPU memory to fit, in GiB: the memory plan chooses the fewest blocks to swap that fit.
    #[arg(long, value_name = "GIB")]
    pub max_vram: Option<f64>,
    /// GPU, with --gradient-checkpointing: keep the block inputs it saves in pinned host memory
    /// (copied on a second stream, back one block ahead of the backward): the same bits, about
    /// 3 GiB less device memory at 1024².
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub offload_checkpoints: Option<bool>,
}

macro_rules! apply {
    ($cfg:ident, $args:expr, $($f:ident),*) => {
        $( if let Some(v) = $args.$f.clone() { $cfg.$f = v; } )*
    };
}

impl Args {
    /// The flags with each `--no-x` folded into its `x` (Some(false)).
    fn switched(&self) -> Args {
        let mut a = self.clone();
        let ad = &mut a.adapter;
        ad.include_modulation = switch(ad.include_modulation, ad.no_include_modulation);
        ad.rslora = switch(ad.rslora, ad.no_rslora);
        a.flip = switch(a.flip, a.no_flip);
        a.vae_sample = switch(a.vae_sample, a.no_vae_sample);
        a.gradient_checkpointing = switch(a.gradient_checkpointing, a.no_gradient_checkpointing);
        a.deterministic_reduce = switch(a.deterministic_reduce, a.no_deterministic_reduce);
        a
    }

    /// The config: checkpoint's (when resuming) or defaults, then the preset (--preset, or the
    /// file's `preset` key), then --config, then the flags. A resumed run's config already holds
    /// its preset's values, so a preset applies only when this command names one.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let mut c = match &self.resume {
            Some(dir) => crate::train::checkpoint::load(dir)?.config,
            None => TrainConfig::default(),
        };
        // Keys present in the file override; parse it again as a table to know which.
        let file = match &self.config {
            Some(p) => Some((TrainConfig::from_toml(p)?, toml::from_str::<toml::Table>(&std::fs::read_to_string(p)?)?)),
            None => None,
        };
        let file_preset = file.as_ref().filter(|(_, t)| t.contains_key("preset")).map(|(f, _)| f.preset.clone());
        if let Some(name) = self.preset.clone().or(file_preset) {
            c.apply_preset(&name).with_context(|| match &self.preset {
                Some(_) => "--preset".to_string(),
                None => format!("{}: key `preset`", self.config.as_ref().unwrap().display()),
            })?;
        }
        if let Some((file, table)) = &file {
            let mut merged = serde_json::to_value(&c)?;
            let fv = serde_json::to_value(file)?;
            for k in table.keys() {
                merged[k] = fv[k].clone();
            }
            c = serde_json::from_value(merged)?;
        }
        let a = &self.switched();
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
            preset,
            dropout,
            init,
            steps,
            lr,
            batch_size,
            grad_accum,
            batch_slices,
            deterministic_reduce,
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
            gradient_checkpointing,
            blocks_to_swap,
            max_vram,
            offload_checkpoints
        );
        if let Some(p) = &a.nsfw.nsfw_model {
            c.nsfw_model = p.display().to_string();
        }
        if let Some(v) = switch(a.nsfw.nsfw_check, a.nsfw.no_nsfw_check) {
            c.nsfw_check = Some(v);
        }
        if let Some(k) = &a.adapter_kind {
            c.adapter = k.clone();
            if k == "lokr" && a.format.is_none() {
                c.format = "kohya".into();
            }
        }
        if let Some(f) = a.lokr_factor {
            c.lokr_factor = f;
        }
        apply!(c, a.adapter, rank, alpha, targets, include_modulation, rank_pattern, alpha_pattern, rslora);
        if c.model.is_empty() && c.data.is_empty() && self.resume.is_none() {
            c = c.builtin_demo();
        }
        Ok(c)
    }
}

pub fn main(args: Args) -> Result<()> {
    let o = run(&args)?;
    if o.interrupted {
        println!("interrupted after step {}", o.steps_done);
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<Outcome> {
    let env = RankEnv::from_env()?;
    let gpus = args.gpus.unwrap_or(1);
    match (&env, gpus) {
        (_, 0) => bail!("--gpus 0: at least one"),
        // The launcher: this process starts the ranks and waits for them.
        (None, n) if n > 1 => {
            let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            // Ctrl-C reaches every rank (one process group): they agree on a step, checkpoint
            // and end; the launcher only waits for them.
            let _ = ctrlc::set_handler(|| {});
            crate::dist::launch(n, &argv)?;
            return Ok(Outcome {
                steps_done: 0,
                interrupted: false,
                lora_path: None,
                final_loss: f64::NAN,
                demo: None,
                log: vec![],
            });
        }
        (Some(e), n) if n > 1 && e.world != n => {
            bail!("--gpus {n}, but WORLD_SIZE={} is set: give one or the other", e.world)
        }
        _ => {}
    }
    if let Some(e) = &env {
        e.pin_gpu();
    }
    let mut tc = args.resolve()?;
    // One rank speaks for the run.
    if let Some(line) = tc.preset_summary().filter(|_| env.as_ref().is_none_or(|e| e.rank == 0)) {
        println!("{line}");
    }
    if let Some(line) = super::plan::choose_blocks_to_swap(&mut tc)? {
        println!("{line}");
    }
    super::plan::check_before_training(&tc)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // Ctrl-C: finish the current step, save a checkpoint, write the LoRA, exit cleanly.
    let _ = ctrlc::set_handler(move || s.store(true, std::sync::atomic::Ordering::SeqCst));
    let r = train_ranked(tc, args.resume.as_deref(), stop, false, env.as_ref());
    match &env {
        Some(e) => r.with_context(|| format!("rank {} of {}", e.rank, e.world)),
        None => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        a: Args,
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
                _ if k == "preset" => "concept".to_string(),
                // Absent by default (the check runs when weights are found).
                _ if k == "nsfw_check" => "true".to_string(),
                serde_json::Value::Bool(_) => "true".to_string(),
                serde_json::Value::Number(n) if n.is_u64() => "7".to_string(),
                serde_json::Value::Number(n) if n.is_i64() => "5".to_string(),
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

    /// A switch pair overrides the TOML value either way; neither leaves it; the old value
    /// form still parses.
    #[test]
    fn switch_pairs_override_the_config_either_way() {
        let dir = std::env::temp_dir().join(format!("fk-train-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let on = dir.join("on.toml");
        std::fs::write(&on, "model = \"m\"\nflip = true\ngradient_checkpointing = true\n").unwrap();
        let off = dir.join("off.toml");
        std::fs::write(&off, "model = \"m\"\nflip = false\ngradient_checkpointing = false\n").unwrap();
        let resolve = |toml: &std::path::Path, flags: &[&str]| {
            let mut argv = vec!["t", "--config", toml.to_str().unwrap()];
            argv.extend(flags);
            let c = Wrap::try_parse_from(argv).unwrap_or_else(|e| panic!("{flags:?}: {e}")).a.resolve().unwrap();
            (c.flip, c.gradient_checkpointing)
        };
        assert_eq!(resolve(&on, &[]), (true, true));
        assert_eq!(resolve(&off, &[]), (false, false));
        assert_eq!(resolve(&on, &["--no-flip", "--no-gradient-checkpointing"]), (false, false));
        assert_eq!(resolve(&off, &["--flip", "--gradient-checkpointing"]), (true, true));
        assert_eq!(resolve(&off, &["--flip", "true", "--gradient-checkpointing", "false"]), (true, false));
        assert_eq!(resolve(&on, &["--flip", "false"]), (false, true));
        // The last of a pair wins.
        assert_eq!(resolve(&off, &["--flip", "--no-flip"]), (false, false));
        assert_eq!(resolve(&on, &["--no-flip", "--flip"]), (true, true));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
